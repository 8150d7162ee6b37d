"""Sequential testing against fixed K on held-out attacks: rows per verdict, AUROC, TPR and agreement.

    python -m nccr_guard.eval.sequential --model models/speaker --split dev --n 60 --out reports/sequential/speaker-dev

Attacks a split with ART (as `nccr-guard evaluate` does), forwards every input's fixed-K rows once, then replays
each schedule's sequential test over those very rows (`engine.sequential.replay`, the decisions the detector
makes online), so sequential and fixed-K verdicts are compared on identical noise copies. Schedules are chosen
on the dev split; the test split only reports. Adversarial examples are cached under the cache folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from nccr_guard.calibrate import activations
from nccr_guard.detector import Detector
from nccr_guard.engine import score_rows
from nccr_guard.engine.sequential import Schedule, replay
from nccr_guard.eval.attacks import attack_key, attack_succeeded, attack_table, correctly_classified, run_attack
from nccr_guard.eval.metrics import auroc, rate_above
from nccr_guard.eval.report import machine
from nccr_guard.speaker_corpus import cache_dir

GRID = [Schedule(f, s, z) for f in (1, 2, 4) for s in (1, 2, 4) for z in (1.0, 2.0, 3.0)]
# Per-family first rounds: two spread shifts (a mean needs two copies for a standard error) and one
# copy of every other noise family, whose 0/1 flips settle from one copy under the clean prior.
GRID += [Schedule(1, s, z, (("sweep", 2),)) for s in (1, 2) for z in (1.0, 1.5, 2.0, 3.0)]
# Three spread shifts first: after the recalibration raised the speaker threshold, the two-shift mean
# stops more adversarial clips early on a noisy estimate; a third shift is one more row on clips that settle.
GRID += [Schedule(1, s, 1.5, (("sweep", 3),)) for s in (1, 2)]


def schedule_record(schedule: Schedule) -> dict:
    """A schedule as the JSON report keeps it: its fields, and its label, which `Schedule.parse` turns back into
    the schedule (the tables and `--sequential-schedule` speak labels)."""
    return {**dataclasses.asdict(schedule), "label": schedule.label}


def compare(
    det: Detector, clean: dict[str, np.ndarray], adv: dict[str, dict[str, np.ndarray]], schedule: Schedule
) -> dict:
    """Fixed K vs the sequential `schedule` on the same activations (layer -> (B, R, N))."""
    thr = det.calib.threshold
    fixed_c = score_rows(det.variant, det.calib, clean).score
    seq_c, pass_c = replay(det.variant, det.calib, clean, schedule)
    out = {
        "schedule": schedule_record(schedule),
        "fixed_rows": det.variant.rows,
        "clean": {
            "mean_rows": float(pass_c.mean()),
            "fpr_fixed": rate_above(fixed_c, thr),
            "fpr_sequential": rate_above(seq_c.score, thr),
            "agreement": float(np.mean((fixed_c > thr) == (seq_c.score > thr))),
        },
        "attacks": {},
    }
    all_rows = [pass_c]
    for name, acts in adv.items():
        fixed_a = score_rows(det.variant, det.calib, acts).score
        seq_a, pass_a = replay(det.variant, det.calib, acts, schedule)
        all_rows.append(pass_a)
        out["attacks"][name] = {
            "n": len(fixed_a),
            "mean_rows": float(pass_a.mean()),
            "auroc_fixed": auroc(fixed_c, fixed_a),
            "auroc_sequential": auroc(seq_c.score, seq_a.score),
            "tpr_fixed": rate_above(fixed_a, thr),
            "tpr_sequential": rate_above(seq_a.score, thr),
            "agreement": float(np.mean((fixed_a > thr) == (seq_a.score > thr))),
        }
    a = out["attacks"].values()
    out["worst_auroc_loss"] = max((x["auroc_fixed"] - x["auroc_sequential"] for x in a), default=0.0)
    out["worst_tpr_loss"] = max((x["tpr_fixed"] - x["tpr_sequential"] for x in a), default=0.0)
    out["mean_rows_all"] = float(np.concatenate(all_rows).mean())
    return out


def adversarial(
    det: Detector, split: str, n: int, seed: int, attacks: list[str], exclude: int = 0
) -> tuple[np.ndarray, dict]:
    """Correctly classified clean inputs of the split and each attack's successful adversarial examples (cached).
    `exclude`: leave out the inputs a run with n=`exclude` picks (see attacks.correctly_classified)."""
    table = attack_table(det.manifest)
    clf, x0, y0, _ = correctly_classified(det, split, n, exclude)
    cache = cache_dir().parent / "adversarial"
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in attacks:
        f = cache / f"{det.manifest.name}-{sample_key(split, attack_key(table, name), n, seed, exclude)}.npy"
        if not f.exists():
            adv = run_attack(name, clf, x0, seed, table)
            np.save(f, adv[attack_succeeded(name, clf.predict(adv).argmax(1), y0, len(det.manifest.labels))])
        out[name] = np.load(f)
    return x0, out


def sample_key(split: str, what: str, n: int, seed: int, exclude: int) -> str:
    """Cache-name part of one sample of a split: its clean inputs (`what` = "clean") or one attack's."""
    return f"{split}-{what}-n{n}-s{seed}" + (f"-x{exclude}" if exclude else "")


def cached_activations(det: Detector, xs: np.ndarray, key: str) -> dict[str, np.ndarray]:
    """Fixed-K activations of `xs`, cached beside the adversarial examples (replays are cheap, forwards not)."""
    f = cache_dir().parent / "adversarial" / f"{det.manifest.name}-{det.variant.name}-k{det.variant.rows}-{key}.npz"
    if f.exists():
        with np.load(f) as z:
            return {k: z[k] for k in z.files}
    acts = activations(det, xs, desc=key)
    np.savez(f, **acts)
    return acts


def pooled(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Activations of several samples as one (layer -> inputs of every part, in order)."""
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--split", default="dev", help="dev to choose a schedule, test to report it")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attacks", nargs="+", default=None, help="default: the modality's attack table")
    ap.add_argument(
        "--exclude",
        type=int,
        default=0,
        help="leave out the inputs a run with --n EXCLUDE picks: a second sample of the split no earlier run saw",
    )
    ap.add_argument(
        "--pool",
        action="store_true",
        help="with --exclude: score both samples together (the one --n EXCLUDE picks and this one), for a choice "
        "that one clip moves less",
    )
    ap.add_argument("--grid", action="store_true", help="replay every schedule of the grid, not just the variant's")
    ap.add_argument(
        "--schedule",
        nargs="+",
        default=[],
        metavar="FIRST/STEP/Z",
        help="replay these schedules (labels as in the tables, e.g. '1 (sweep 3)/1/1.5'; after the grid's with "
        "--grid), instead of the variant's: what a server's --sequential-schedule would do on these clips",
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    np.random.seed(args.seed)
    import torch

    torch.manual_seed(args.seed)
    det = Detector.load(args.model, device="cpu", seed=args.seed, sequential=False)
    try:
        extra = [det.variant.with_schedule(Schedule.parse(label)).sequential for label in args.schedule]
    except ValueError as e:
        ap.error(str(e))
    table = attack_table(det.manifest)
    attacks = args.attacks or list(table)
    if args.pool and not args.exclude:
        ap.error("--pool needs --exclude (the other sample)")
    samples = [(args.n, args.seed, args.exclude)] + ([(args.exclude, args.seed, 0)] if args.pool else [])
    cleans, advs_acts = [], []
    for sample in samples:
        n, seed, exclude = sample
        x0, advs = adversarial(det, args.split, n, seed, attacks, exclude)
        cleans.append(cached_activations(det, x0, sample_key(args.split, "clean", *sample)))
        advs_acts.append(
            {
                a: cached_activations(det, x, sample_key(args.split, attack_key(table, a), *sample))
                for a, x in advs.items()
                if len(x)
            }
        )
    clean = pooled(cleans)
    adv = {a: pooled([s[a] for s in advs_acts if a in s]) for a in dict.fromkeys(a for s in advs_acts for a in s)}
    n_clean = len(clean["logits"])
    schedules = list(dict.fromkeys((GRID if args.grid else []) + extra)) or [det.variant.sequential or Schedule()]
    runs = [compare(det, clean, adv, s) for s in schedules]
    for r in runs:
        print(
            json.dumps(
                {
                    "schedule": r["schedule"],
                    "rows": round(r["mean_rows_all"], 2),
                    "clean_rows": round(r["clean"]["mean_rows"], 2),
                    "auroc_loss": round(r["worst_auroc_loss"], 4),
                    "tpr_loss": round(r["worst_tpr_loss"], 4),
                }
            )
        )
    result = {
        "model": det.manifest.name,
        "variant": det.variant.name,
        "split": args.split
        + (
            f" (both samples: --n {args.exclude} and the {args.n} after it)"
            if args.pool
            else f" (without the {args.exclude} inputs of --n {args.exclude})"
            if args.exclude
            else ""
        ),
        "n_clean": n_clean,
        "seed": args.seed,
        "command": "python -m nccr_guard.eval.sequential " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "seconds": round(time.perf_counter() - t0, 1),
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sequential.json").write_text(json.dumps(result, indent=1))
    (args.out / "sequential.md").write_text(markdown(result))
    print(f"wrote {args.out}/sequential.json")


def markdown(result: dict) -> str:
    attacks = list(result["runs"][0]["attacks"]) if result["runs"] else []
    lines = [
        f"# Sequential testing vs fixed K: {result['model']} (`{result['variant']}`, {result['split']} split)",
        "",
        f"Command: `{result['command']}` · seed {result['seed']} · {result['machine']} · {result['seconds']} s (a "
        "first run attacks the split, ~12 min; later runs reuse the cached clips and activations) · "
        f"{result['n_clean']} clean inputs; adversarial = successful attacks only; same noise copies for both.",
        "",
        "| first | step | z | rows clean | "
        + " | ".join(f"{a}: rows, AUROC fixed→seq, TPR fixed→seq" for a in attacks)
        + " | clean FPR fixed→seq |",
        "|---" * (4 + len(attacks) + 1) + "|",
    ]
    for r in result["runs"]:
        s, c = Schedule.parse(r["schedule"]["label"]), r["clean"]
        cells = [
            f"{m['mean_rows']:.1f}, {m['auroc_fixed']:.3f}→{m['auroc_sequential']:.3f}, "
            f"{m['tpr_fixed']:.3f}→{m['tpr_sequential']:.3f}"
            for m in r["attacks"].values()
        ]
        lines.append(
            f"| {s.first_label} | {s.step} | {s.z:g} | {c['mean_rows']:.1f} of {r['fixed_rows']} | "
            + " | ".join(cells)
            + f" | {c['fpr_fixed']:.3f}→{c['fpr_sequential']:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
