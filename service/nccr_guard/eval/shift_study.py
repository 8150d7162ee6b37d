"""Why `nccr-audio-v2` spreads its shifts: the margin drop against the shift, and the mean over few shifts.

    python -m nccr_guard.eval.shift_study --model models/speaker --out reports/speaker/shift-study

Shifts every clean and adversarial dev clip (the cached attacks of `nccr_guard.eval.sequential`) by each point
of a 25-sample grid over ±400 samples and records the top class's relative margin drop (the `margin` measure).
Then it draws copies from that grid many times, independently (`shift`, v1) or spread from a random start
(`sweep`, v2), and reports the AUROC of the mean drop over the first m copies (the shift component alone,
clean vs each attack) and its correlation with the mean over the whole grid on clean clips. Only the dev
split: this motivates a design, the test split reports it (reports/speaker/eval.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from nccr_guard.detector import Detector
from nccr_guard.engine.perturb import van_der_corput
from nccr_guard.engine.score import class_margin
from nccr_guard.eval.attacks import attack_table
from nccr_guard.eval.metrics import auroc
from nccr_guard.eval.sequential import adversarial

GRID = np.arange(-400, 401, 25)
DRAWS = 40


def margin_drops(det: Detector, xs: np.ndarray, chunk: int = 8) -> np.ndarray:
    """(n, len(GRID)) relative margin drop of each clip's predicted class under each grid shift."""
    out = []
    for i in range(0, len(xs), chunk):
        xb = xs[i : i + chunk]
        rows = np.stack([np.stack([x] + [np.roll(x, int(s), -1) for s in GRID]) for x in xb])
        b, r = rows.shape[:2]
        logits = det.forward(rows.reshape(b * r, *rows.shape[2:]))["logits"].reshape(b, r, -1)
        m = class_margin(logits, logits[:, 0].argmax(-1))
        out.append(np.maximum(m[:, :1] - m[:, 1:], 0) / np.maximum(np.abs(m[:, :1]), 1e-6))
    return np.concatenate(out)


def draw(n: int, design: str, rng: np.random.Generator, k: int = 8) -> np.ndarray:
    """(n, k) grid indices of k copies per clip."""
    if design == "shift":
        return rng.integers(0, len(GRID), (n, k))
    u = (rng.random((n, 1)) + van_der_corput(k)[None]) % 1.0
    return np.round(u * (len(GRID) - 1)).astype(int)


def study(drops: dict[str, np.ndarray], seed: int) -> dict:
    """Per design and prefix length m: mean AUROC of the m-copy mean per attack and its correlation with the
    whole-grid mean on clean clips, over DRAWS draws."""
    full = np.log(drops["clean"].mean(1) + 1e-6)
    out = {}
    for design in ("shift", "sweep"):
        acc: dict[str, list[float]] = {}
        for d in range(DRAWS):
            rng = np.random.default_rng(seed + d)
            idx = {k: draw(len(v), design, rng) for k, v in drops.items()}
            for m in (1, 2, 4, 8):
                stat = {k: np.log(np.take_along_axis(v, idx[k][:, :m], 1).mean(1) + 1e-6) for k, v in drops.items()}
                for a in drops:
                    if a != "clean":
                        acc.setdefault(f"{m}|{a}", []).append(auroc(stat["clean"], stat[a]))
                acc.setdefault(f"{m}|corr", []).append(float(np.corrcoef(stat["clean"], full)[0, 1]))
        out[design] = {k: round(float(np.mean(v)), 4) for k, v in acc.items()}
    out["grid"] = {a: round(auroc(full, np.log(v.mean(1) + 1e-6)), 4) for a, v in drops.items() if a != "clean"}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/speaker"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    det = Detector.load(args.model, device="cpu", seed=args.seed, sequential=False)
    x0, advs = adversarial(det, "dev", args.n, args.seed, list(attack_table(det.manifest)))
    drops = {"clean": margin_drops(det, x0)} | {a: margin_drops(det, x) for a, x in advs.items() if len(x)}
    result = {
        "command": "python -m nccr_guard.eval.shift_study --model "
        + f"{args.model} --n {args.n} --seed {args.seed} --out {args.out}",
        "machine": platform.machine(),
        "seconds": 0.0,
        "grid": GRID.tolist(),
        "mean_drop_by_shift": {a: np.round(v.mean(0), 3).tolist() for a, v in drops.items()},
        "draws": DRAWS,
        "results": study(drops, args.seed),
    }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shift-study.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "shift-study.md").write_text(markdown(result))
    print((args.out / "shift-study.md").read_text())


def markdown(r: dict) -> str:
    attacks = list(r["results"]["grid"])
    lines = [
        "# Shift copies drawn alone (`shift`, nccr-audio-v1) or spread (`sweep`, v2): speaker, dev split",
        "",
        f"Command: `{r['command']}` · {r['machine']} · {r['seconds']} s · {r['draws']} draws per design. "
        "Shift component alone (relative margin drop, mean over the first m copies): AUROC clean vs attack, and "
        "the correlation of the clean clips' m-copy mean with their mean over the whole 25-sample grid.",
        "",
        "| design | m | " + " | ".join(attacks) + " | corr. with grid mean |",
        "|---" * (3 + len(attacks)) + "|",
    ]
    for design in ("shift", "sweep"):
        res = r["results"][design]
        for m in (1, 2, 4, 8):
            cells = [f"{res[f'{m}|{a}']:.3f}" for a in attacks]
            lines.append(f"| {design} | {m} | " + " | ".join(cells) + f" | {res[f'{m}|corr']:.2f} |")
    grid = " | ".join(f"{r['results']['grid'][a]:.3f}" for a in attacks)
    lines.append(f"| whole grid | {len(r['grid'])} | {grid} | 1 |")
    lines += ["", "Mean drop by shift (samples → drop), clean and FGSM:", ""]
    for a in ("clean", "fgsm"):
        if a in r["mean_drop_by_shift"]:
            pairs = ", ".join(f"{s}: {d:.2f}" for s, d in zip(r["grid"], r["mean_drop_by_shift"][a], strict=True))
            lines.append(f"- {a}: {pairs}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
