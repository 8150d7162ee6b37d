// The try-it page: pick a model, send a file or a drawn digit to POST v1/explain (the answer of v1/detect and
// what its score is made of), show both; with the server's --attack-demo, attack the input on the server.
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

let last = null; // the input last scored: {blob, filename, model, url}, what "Make it adversarial" attacks

function post(path, blob, filename, model) {
  const form = new FormData();
  form.append("file", blob, filename);
  return api(model ? `${path}?model=${encodeURIComponent(model)}` : path, { method: "POST", body: form });
}

async function detect(blob, filename) {
  showError("");
  showError("", "attack"); // a new input: the last attack's failure is no longer about it
  $("busy").hidden = false;
  $("pair").hidden = true;
  try {
    // A server run with --no-explain gives the verdict only (its cards say explain: false).
    const explains = !cards.length || cards.some((c) => c.explain);
    let detection, explanation = null;
    if (explains) ({ detection, explanation } = await post("v1/explain", blob, filename, $("model").value));
    else detection = await post("v1/detect", blob, filename, $("model").value);
    last = { blob, filename, model: detection.model, url: URL.createObjectURL(blob) };
    show(detection);
    for (const id of ["dist-block", "explained", "rows-block"]) $(id).hidden = !explanation;
    if (explanation) explain(explanation, detection);
    const card = cardOf(detection.model);
    $("attack").hidden = !(card && card.attack_demo && detection.modality === "image");
  } catch (e) {
    $("result").hidden = true;
    showError(`Not scored: ${e.message}`);
  } finally {
    $("busy").hidden = true;
  }
}

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

// The clean calibration scores as bars, the threshold dashed, the score as a line in the verdict's colour. A
// score far beyond the clean scores (an attacked input's logistic score can be 30) is pinned to the edge.
function drawDistribution(clean, score, threshold, verdict) {
  const box = $("dist");
  const [W, H, left, right, top, bottom] = [640, 150, 10, 10, 22, 22];
  const edges = clean.edges, counts = clean.counts;
  let lo = Math.min(edges[0], threshold), hi = Math.max(edges[edges.length - 1], threshold);
  const span = hi - lo || 1;
  const room = 0.25 * span; // how far the axis stretches to take the score in
  if (score < lo) lo = Math.max(score, lo - room);
  if (score > hi) hi = Math.min(score, hi + room);
  const x = (v) => left + ((Math.min(Math.max(v, lo), hi) - lo) / (hi - lo)) * (W - left - right);
  const peak = Math.max(...counts, 1);
  const base = H - bottom;
  const parts = [];
  counts.forEach((c, i) => {
    const h = (c / peak) * (base - top);
    parts.push(svg("rect", { class: "bar", x: x(edges[i]) + 0.5, y: base - h, width: Math.max(x(edges[i + 1]) - x(edges[i]) - 1, 1), height: h }));
  });
  parts.push(svg("line", { x1: left, x2: W - right, y1: base, y2: base, stroke: "#d0d5dd" }));
  for (const v of [lo, hi]) parts.push(svg("text", { x: x(v), y: H - 6, "text-anchor": v === lo ? "start" : "end" }, fmt(v, 3)));
  parts.push(svg("line", { class: "thr", x1: x(threshold), x2: x(threshold), y1: top - 8, y2: base }));
  parts.push(svg("text", { x: x(threshold) + 4, y: top - 10 + 22, "text-anchor": "start" }, `threshold ${fmt(threshold, 3)}`));
  const off = score < lo || score > hi;
  const sx = x(score);
  parts.push(svg("line", { class: `score ${verdict}`, x1: sx, x2: sx, y1: 4, y2: base }));
  const anchor = sx > W / 2 ? "end" : "start";
  const label = `this input ${fmt(score, 3)}${off ? (score > hi ? " (off the scale →)" : " (← off the scale)") : ""}`;
  parts.push(svg("text", { class: "score-label", x: sx + (anchor === "end" ? -5 : 5), y: 14, "text-anchor": anchor }, label));
  box.replaceChildren(svg("title", {}, `${clean.n} clean calibration scores, threshold and this input's score`), ...parts);
  box.dataset.bars = String(counts.length);
  box.dataset.clean = String(clean.n);
  box.dataset.score = String(score);
}

function explain(e, r) {
  drawDistribution(e.clean, r.score, r.threshold, r.verdict);
  const c = e.combiner;
  const logistic = c.kind === "logistic";
  $("contrib-weight").hidden = !logistic;
  $("contrib-note").textContent = logistic
    ? `A logistic combination: the score is the bias plus weight × z summed over all ${c.n_components} components; ` +
      `the ${c.components.length} largest terms:`
    : `The score is the largest z-score of the ${c.n_components} components (marked):`;
  const rows = c.components.map((k) => {
    const tr = document.createElement("tr");
    if (k.max) tr.className = "max";
    const name = Object.assign(document.createElement("td"), { className: "name" });
    name.append(Object.assign(document.createElement("code"), { textContent: k.name }));
    if (k.max) name.append(Object.assign(document.createElement("span"), { className: "mark", textContent: "max" }));
    const cell = (v, cls = "") => Object.assign(document.createElement("td"), { textContent: v, className: cls });
    tr.append(name, cell(fmt(k.z, 3)));
    if (logistic) tr.append(cell(fmt(k.weight, 3)));
    tr.append(cell(fmt(k.contribution, 3), k.contribution > 0 ? "pos" : k.contribution < 0 ? "neg" : ""));
    return tr;
  });
  $("contribs").tBodies[0].replaceChildren(...rows);
  const foot = $("contrib-foot");
  foot.textContent = logistic
    ? `bias ${fmt(c.bias, 3)} + these ${c.components.length} terms + the other ${c.n_components - c.components.length} ` +
      `(${fmt(c.rest, 3)}) = ${fmt(e.score, 4)}`
    : `score = max z = ${fmt(e.score, 4)}`;
  foot.colSpan = logistic ? 4 : 3;
  const thumbs = e.thumbnails.map((t) => {
    const fig = document.createElement("figure");
    fig.dataset.perturbation = t.perturbation;
    const img = Object.assign(document.createElement("img"), { src: t.image, alt: `${t.perturbation} (${t.what})` });
    const cap = document.createElement("figcaption");
    cap.textContent = `${t.perturbation}, ${t.what}${t.prediction !== null ? `: ${t.prediction}` : ""}`;
    fig.append(img, cap);
    return fig;
  });
  $("thumbs").replaceChildren(...thumbs);
  $("rows-note").textContent = thumbs.length
    ? `${thumbs.length} of the ${e.rows} rows: the input, each deterministic squeeze, and the first copy of each noise ` +
      "family, with the model's label for each." +
      (e.rows_as_verdict ? "" : " The noise copies are a fresh draw: this server drew the verdict's own on its GPU.")
    : "";
  $("rows-block").hidden = !thumbs.length;
}

function caption(fig, d, what) {
  const cap = fig.querySelector("figcaption");
  const v = Object.assign(document.createElement("span"), { className: `verdict ${d.verdict}`, textContent: d.verdict });
  v.dataset.verdict = d.verdict;
  const p = d.prediction;
  cap.replaceChildren(
    document.createTextNode(`${what}: `),
    v,
    document.createElement("br"),
    document.createTextNode(`predicted ${p.label} (${(p.confidence * 100).toFixed(1)} %), score ${fmt(d.score, 4)}`),
  );
}

async function attack() {
  if (!last) return;
  showError("", "attack");
  $("attack-busy").hidden = false;
  $("attack").disabled = true;
  try {
    const a = await post("v1/attack", last.blob, last.filename, last.model);
    $("pair-clean").querySelector("img").src = last.url;
    $("pair-adv").querySelector("img").src = a.image;
    caption($("pair-clean"), a.clean, "clean");
    caption($("pair-adv"), a.adversarial, "adversarial");
    const k = a.attack;
    $("pair-note").textContent =
      `${k.name}, ${k.max_iter} steps of ${fmt(k.eps_step, 3)} within ${fmt(k.eps, 3)} of each value; the largest ` +
      `change is ${fmt(k.l_inf, 3)} of the input range. The adversarial image is what was scored (8-bit PNG).`;
    $("pair").hidden = false;
  } catch (e) {
    showError(`Not attacked: ${e.message}`, "attack");
  } finally {
    $("attack-busy").hidden = true;
    $("attack").disabled = false;
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
  $("result").hidden = false;
}

function componentsOf(card) {
  if (!card) return [document.createTextNode("")];
  if (card.components.length > 12) {
    const below = card.explain ? "; the largest contributions are below" : "";
    return [document.createTextNode(`the score combines ${card.components.length} standardised components of ${card.variant}${below}`)];
  }
  const out = [document.createTextNode(`the score combines ${card.components.length} standardised components of ${card.variant}: `)];
  card.components.forEach((name, i) => {
    const code = document.createElement("code");
    code.textContent = name;
    out.push(code, document.createTextNode(i + 1 < card.components.length ? " " : ""));
  });
  return out;
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

$("attack").addEventListener("click", attack);
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
