// The try-it page: pick a model, send a file or a drawn digit to POST v1/detect, show the answer.
// Plain script, no build step and no dependency; every URL is relative to the page's <base href>, which the
// server sets to its root path, so the page works behind a proxy that serves the API under a prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "nccr-guard-api-key";
let cards = [];

function keyHeaders() {
  const key = $("key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function api(path, init = {}) {
  const response = await fetch(path, { ...init, headers: { ...keyHeaders(), ...(init.headers || {}) } });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    const why = body && body.error ? body.error : response.statusText;
    throw new Error(`${response.status}: ${why}`);
  }
  return body;
}

// `source`: what the message is about; a later success of the same source clears only its own message.
function showError(message, source = "detect") {
  const box = $("error");
  if (!message && source !== box.dataset.source) return;
  box.textContent = message;
  box.dataset.source = source;
  box.hidden = !message;
}

let loads = 0;

async function loadModels() {
  const select = $("model");
  const chosen = select.value;
  const load = ++loads;
  let found;
  try {
    found = await api("v1/models");
  } catch (e) {
    if (load !== loads) return; // a later load (another key) answers instead
    cards = [];
    const hint = e.message.startsWith("401") ? " Enter the API key." : "";
    showError(`Could not list the models (${e.message}).${hint}`, "models");
    return;
  }
  if (load !== loads) return;
  cards = found;
  showError("", "models");
  select.replaceChildren(new Option("by the file's type", ""));
  for (const c of cards) select.add(new Option(`${c.name} (${c.modality}, ${c.labels.length} classes)`, c.name));
  if (cards.some((c) => c.name === chosen)) select.value = chosen;
  describeModel();
}

function cardOf(name) {
  return cards.find((c) => c.name === name);
}

function describeModel() {
  const c = cardOf($("model").value);
  $("model-info").textContent = c
    ? `variant ${c.variant}, ${c.backend} on ${c.device}, threshold ${fmt(c.calibration.threshold)} at ` +
      `${Math.round(c.calibration.target_fpr * 100)} % clean false positives`
    : cards.length ? `serving ${cards.map((c) => c.name).join(", ")}: images go to the image model, audio to the audio one` : "";
}

function fmt(x, digits = 4) {
  return typeof x === "number" ? Number(x.toPrecision(digits)).toString() : String(x);
}

async function detect(blob, filename) {
  showError("");
  $("busy").hidden = false;
  const form = new FormData();
  form.append("file", blob, filename);
  const model = $("model").value;
  try {
    const result = await api(model ? `v1/detect?model=${encodeURIComponent(model)}` : "v1/detect", {
      method: "POST",
      body: form,
    });
    show(result);
  } catch (e) {
    $("result").hidden = true;
    showError(`Not scored: ${e.message}`);
  } finally {
    $("busy").hidden = true;
  }
}

function show(r) {
  const verdict = $("verdict");
  verdict.textContent = r.verdict;
  verdict.className = `verdict ${r.verdict}`;
  verdict.dataset.verdict = r.verdict;
  $("what").textContent = `${r.model} (${r.modality})`;
  $("score").textContent = fmt(r.score);
  $("threshold").textContent = fmt(r.threshold);
  $("p-value").textContent = fmt(r.p_value, 3);
  $("ood-row").hidden = !("ood" in r);
  $("ood").textContent = r.ood ? "yes" : "no";
  const p = r.prediction;
  $("prediction").textContent = `${p.label} (class ${p.index}), ${(p.confidence * 100).toFixed(1)} %`;
  const card = cardOf(r.model);
  $("passes").textContent = card ? `${r.passes} of ${card.passes}` : String(r.passes);
  const t = r.timings_ms;
  $("timings").textContent = `${fmt(t.queue, 3)} + ${fmt(t.compute, 3)} ms, ${fmt(t.total, 3)} ms total`;
  $("components").replaceChildren(...componentsOf(card));
  drawScale(r.score, r.threshold, r.verdict);
  $("result").hidden = false;
}

function componentsOf(card) {
  if (!card) return [document.createTextNode("")];
  const out = [document.createTextNode(`the score combines ${card.components.length} standardised components of ${card.variant}: `)];
  card.components.forEach((name, i) => {
    const code = document.createElement("code");
    code.textContent = name;
    out.push(code, document.createTextNode(i + 1 < card.components.length ? " " : ""));
  });
  return out;
}

function drawScale(score, threshold, verdict) {
  const top = Math.max(threshold * 2, score * 1.1, 1e-9);
  const at = (v) => `${(100 * Math.min(Math.max(v, 0), top)) / top}%`;
  $("scale-fill").style.width = at(score);
  $("scale-fill").className = `fill ${verdict}`;
  $("scale-score").style.left = at(score);
  $("scale-threshold").style.left = at(threshold);
  const label = $("scale-threshold-label");
  label.textContent = `threshold ${fmt(threshold, 3)}`;
  label.style.left = `calc(${at(threshold)} - 3em)`;
  $("scale-max").textContent = fmt(top, 3);
}

function preview(file) {
  const box = $("preview");
  const url = URL.createObjectURL(file);
  const media = file.type.startsWith("audio/") || /\.(wav|flac|ogg|mp3)$/i.test(file.name)
    ? Object.assign(document.createElement("audio"), { controls: true, src: url })
    : Object.assign(document.createElement("img"), { src: url, alt: file.name });
  const name = Object.assign(document.createElement("span"), { className: "name", textContent: file.name });
  box.replaceChildren(media, name);
}

function takeFile(file) {
  if (!file) return;
  preview(file);
  detect(file, file.name);
}

// The drawing pad: white strokes on black, as MNIST's digits are.
const pad = $("pad");
const ink = pad.getContext("2d");
let drawing = false;
let inked = false;

function clearPad() {
  ink.fillStyle = "#000";
  ink.fillRect(0, 0, pad.width, pad.height);
  inked = false;
}

function point(e) {
  const box = pad.getBoundingClientRect();
  return [((e.clientX - box.left) * pad.width) / box.width, ((e.clientY - box.top) * pad.height) / box.height];
}

pad.addEventListener("pointerdown", (e) => {
  drawing = true;
  pad.setPointerCapture(e.pointerId);
  const [x, y] = point(e);
  ink.strokeStyle = "#fff";
  ink.fillStyle = "#fff";
  ink.lineWidth = 22;
  ink.lineCap = "round";
  ink.lineJoin = "round";
  ink.beginPath();
  ink.arc(x, y, ink.lineWidth / 2, 0, 2 * Math.PI);
  ink.fill();
  ink.beginPath();
  ink.moveTo(x, y);
  inked = true;
});
pad.addEventListener("pointermove", (e) => {
  if (!drawing) return;
  const [x, y] = point(e);
  ink.lineTo(x, y);
  ink.stroke();
});
for (const end of ["pointerup", "pointercancel"]) pad.addEventListener(end, () => (drawing = false));

// The drawing as MNIST prepares a digit: its bounding box scaled to 20 px and centred in 28 x 28.
function drawnDigit() {
  const { data } = ink.getImageData(0, 0, pad.width, pad.height);
  let [x0, y0, x1, y1] = [pad.width, pad.height, -1, -1];
  for (let y = 0; y < pad.height; y++) {
    for (let x = 0; x < pad.width; x++) {
      if (data[4 * (y * pad.width + x)] > 32) {
        x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
      }
    }
  }
  const out = Object.assign(document.createElement("canvas"), { width: 28, height: 28 });
  const g = out.getContext("2d");
  g.fillStyle = "#000";
  g.fillRect(0, 0, 28, 28);
  if (x1 >= 0) {
    const w = x1 - x0 + 1, h = y1 - y0 + 1, s = 20 / Math.max(w, h);
    g.imageSmoothingEnabled = true;
    g.imageSmoothingQuality = "high";
    g.drawImage(pad, x0, y0, w, h, 14 - (w * s) / 2, 14 - (h * s) / 2, w * s, h * s);
  }
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

$("clear").addEventListener("click", clearPad);
$("check-drawing").addEventListener("click", async () => {
  if (!inked) {
    showError("Draw a digit first.");
    return;
  }
  const blob = await drawnDigit();
  const img = Object.assign(document.createElement("img"), { src: URL.createObjectURL(blob), alt: "your digit, 28 x 28" });
  $("preview").replaceChildren(img, Object.assign(document.createElement("span"), { className: "name", textContent: "your drawing, as sent (28 × 28)" }));
  detect(blob, "drawing.png");
});

const drop = $("drop");
$("file").addEventListener("change", (e) => takeFile(e.target.files[0]));
drop.addEventListener("dragover", (e) => {
  e.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  takeFile(e.dataTransfer.files[0]);
});

$("model").addEventListener("change", describeModel);
let usedKey = sessionStorage.getItem(KEY_STORE) || "";
$("key").addEventListener("change", () => {
  const key = $("key").value.trim();
  if (key === usedKey) return;
  usedKey = key;
  sessionStorage.setItem(KEY_STORE, key);
  loadModels();
});
$("key").value = usedKey;
clearPad();
loadModels();
