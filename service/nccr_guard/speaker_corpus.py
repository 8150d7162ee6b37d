"""A reproducible synthetic speaker corpus: Debian's espeak-ng voices (with variants) and festival voices.

Each speaker reads its own seeded sentences, different for every split (enrolment = `train`, `calib`, `dev`,
`test`, `holdout`, `holdout2`, `calib2`, `holdout3`), with small per-utterance jitter of speed and pitch so that no
two clips are the same recording. The synthesisers' raw output (16, 22.05 and 32 kHz WAV) is cached on disk and
goes through the same decoder as uploads (`nccr_guard.audio`), so resampling and level normalisation are part of
what is evaluated.

A model folder declares its corpus in `model.toml` `[split]`: `source = "speaker-corpus"`, `voices`, `counts`
(clips per speaker per split) and `seed`; labels are the voice names in order.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from nccr_guard.manifest import Manifest, ManifestError

# `holdout` came after every choice had looked at both `test` samples: its sentences follow the
# others', so no clip repeats an earlier split's, and adding it left their clips unchanged. `holdout2` the
# same way, after the holdout had been scored: a second untouched sample for the same claim. `calib2`:
# more clean calibration clips, since a 95th percentile of 200 clips missed the 5 % target (0.074 over
# 1,097 held-out clips); `holdout3` the clean clips that check the new threshold, scored after it was fixed.
SPLITS = ("train", "calib", "dev", "test", "holdout", "holdout2", "calib2", "holdout3")

_SUBJECTS = [
    "the old farmer",
    "my sister",
    "a quiet student",
    "the night nurse",
    "our neighbour",
    "the tall pilot",
    "a young painter",
    "the city council",
    "the baker next door",
    "his grandmother",
    "the new teacher",
    "a tired driver",
    "the ship's captain",
    "her cousin",
]
_VERBS = [
    "carried",
    "painted",
    "forgot",
    "found",
    "sold",
    "repaired",
    "described",
    "borrowed",
    "watched",
    "counted",
    "opened",
    "measured",
    "wrote about",
    "cleaned",
]
_OBJECTS = [
    "a wooden box",
    "the broken clock",
    "seven yellow apples",
    "an old map",
    "the kitchen window",
    "a letter from home",
    "the silver bicycle",
    "twelve green bottles",
    "the garden gate",
    "a heavy suitcase",
    "the morning paper",
    "a red umbrella",
]
_PLACES = [
    "before the storm",
    "near the river",
    "after lunch",
    "on Tuesday morning",
    "under the bridge",
    "at the station",
    "in the early evening",
    "behind the market",
    "during the holidays",
    "beside the lake",
    "at midnight",
    "in the north field",
]
_ENDINGS = ("", " and then went home", " without saying a word", " as quickly as possible", " for the second time")


def sentences(seed: int, n: int) -> list[str]:
    """The first `n` sentences of a speaker's seeded stream.

    One scalar `integers(0, len)` per word is what `Generator.choice` draws for a list (so the stream, and every
    cached clip's name, is unchanged), without `choice` turning the word list into an array on every call: 6x
    faster, and every corpus load plans its splits through here."""
    rng = np.random.default_rng(seed)

    def pick(words: Sequence[str]) -> str:
        return words[int(rng.integers(0, len(words), dtype=np.int64))]

    out = []
    for _ in range(n):
        s = " ".join(pick(words) for words in (_SUBJECTS, _VERBS, _OBJECTS, _PLACES)) + pick(_ENDINGS)
        out.append(s[0].upper() + s[1:] + ".")
    return out


def synthesise(voice: str, text: str, jitter: float, out: Path) -> None:
    """One clip: `espeak:<voice>` or `festival:<voice>`; `jitter` in [-1, 1] moves speed and pitch a little."""
    engine, _, name = voice.partition(":")
    if engine == "espeak":
        cmd = ["espeak-ng", "-v", name, "-s", str(int(165 + 20 * jitter)), "-p", str(int(50 + 8 * jitter))]
        subprocess.run([*cmd, "-w", str(out), text], check=True, capture_output=True, timeout=60)
    elif engine == "festival":
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(text)
        stretch = f"(Parameter.set 'Duration_Stretch {1.0 + 0.1 * jitter:.3f})"
        try:
            subprocess.run(
                ["text2wave", "-eval", f"(voice_{name})", "-eval", stretch, "-o", str(out), f.name],
                check=True,
                capture_output=True,
                timeout=120,
            )
        finally:
            os.unlink(f.name)
    else:
        raise ManifestError(f"unknown synthesiser in voice {voice!r} (espeak:<voice> or festival:<voice>)")


def missing_tools(voices: list[str]) -> list[str]:
    need = {"espeak-ng" if v.startswith("espeak:") else "text2wave" for v in voices}
    return sorted(t for t in need if shutil.which(t) is None)


def cache_dir() -> Path:
    return Path(os.environ.get("NCCR_GUARD_CACHE", Path.home() / ".cache" / "nccr-guard")) / "speaker-corpus"


# Splits from here on skip a sentence that the same speaker read in an earlier split (or earlier in the same one):
# the sentence stream repeats now and then (one speaker of ten read a `test` sentence in `train`), which a split
# that checks a claim on unseen sentences must not. The splits before it keep their clips.
UNIQUE_FROM = SPLITS.index("calib2")


def split_texts(seed: int, counts: dict[str, int], name: str) -> list[str]:
    """One speaker's sentences of split `name` from the speaker's seeded sentence stream: the splits before
    `UNIQUE_FROM` take consecutive slices; later ones the next sentences not read before."""
    if name not in SPLITS:
        return sentences(seed, counts[name])
    idx = SPLITS.index(name)
    if idx < UNIQUE_FROM:
        offset = sum(counts.get(s, 0) for s in SPLITS[:idx])
        return sentences(seed, offset + counts[name])[offset:]
    pos = sum(counts.get(s, 0) for s in SPLITS[:UNIQUE_FROM])
    stream = sentences(seed, 4 * sum(counts.get(s, 0) for s in SPLITS[: idx + 1]) + 100)
    seen = set(stream[:pos])
    for s in SPLITS[UNIQUE_FROM : idx + 1]:
        texts: list[str] = []
        while len(texts) < counts.get(s, 0):
            pos += 1
            if stream[pos - 1] not in seen:
                seen.add(stream[pos - 1])
                texts.append(stream[pos - 1])
    return texts


def corpus_plan(split: dict, name: str) -> list[tuple[int, str, str, float]]:
    """(speaker index, voice, sentence, jitter) for every clip of split `name`, in a fixed order."""
    voices, counts, seed = split["voices"], split["counts"], int(split.get("seed", 0))
    if name not in counts:
        raise ManifestError(f"speaker corpus has no split {name!r} (have {sorted(counts)})")
    plan = []
    for i, voice in enumerate(voices):
        texts = split_texts(seed * 1000 + i, counts, name)
        rng = np.random.default_rng([seed, i, SPLITS.index(name) if name in SPLITS else 9])
        plan += [(i, voice, t, float(j)) for t, j in zip(texts, rng.uniform(-1, 1, len(texts)), strict=True)]
    return plan


def clip_path(voice: str, text: str, jitter: float) -> Path:
    key = hashlib.sha256(f"{voice}|{text}|{jitter:.6f}".encode()).hexdigest()[:20]
    return cache_dir() / voice.replace(":", "_").replace("+", "_") / f"{key}.wav"


def corpus_files(
    split: dict, name: str, limit: int | None = None, index: np.ndarray | None = None
) -> tuple[list[Path], np.ndarray]:
    """The raw clips of a split (synthesised once, then cached) and their speaker indices; `index`: only the
    clips at these positions of the (limited) plan, the only ones synthesised."""
    plan = corpus_plan(split, name)
    if limit is not None:  # a few clips of every speaker, for smoke runs
        per = max(1, limit // len(split["voices"]))
        plan = [p for i, p in enumerate(plan) if i % split["counts"][name] < per]
    if index is not None:
        plan = [plan[i] for i in np.asarray(index, int)]
    tools = missing_tools(split["voices"])
    todo = [p for p in plan if not clip_path(*p[1:]).exists()]
    if todo and tools:
        raise ManifestError(f"the speaker corpus needs {', '.join(tools)} (apt-get install espeak-ng festival ...)")

    def make(p: tuple[int, str, str, float]) -> None:
        path = clip_path(*p[1:])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.wav")
        synthesise(p[1], p[2], p[3], tmp)
        tmp.replace(path)

    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        list(pool.map(make, todo))
    return [clip_path(*p[1:]) for p in plan], np.array([p[0] for p in plan], np.int64)


def load_corpus_split(
    manifest: Manifest, name: str, limit: int | None = None, index: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs (n, 1, samples), speaker labels) of a split, decoded like uploads."""
    from nccr_guard.audio import decode_audio
    from nccr_guard.inputs import Limits

    files, ys = corpus_files(manifest.split, name, limit, index)
    xs = np.stack([decode_audio(f.read_bytes(), manifest, Limits(max_bytes=1 << 30)) for f in files])
    return xs, ys
