"""`nccr-guard`: the command line. Each command parses flags and calls the same functions as the server and
the harness; errors print as one line with a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import get_args, get_origin

from nccr_guard import __version__
from nccr_guard.config import Settings, default_models


def _model_default() -> Path:
    models = default_models()
    return models[0] if models else Path("models/mnist")


def _add_model_flags(p: argparse.ArgumentParser, backend: bool = True, by_type: bool = False) -> None:
    if by_type:
        p.add_argument("--model", type=Path, default=None, help="model folder (default: by each file's type)")
    else:
        p.add_argument("--model", type=Path, default=_model_default(), help="model folder (default: %(default)s)")
    if backend:
        p.add_argument("--backend", choices=["torch", "onnx", "auto"], default="auto")
        p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    """One flag per Settings field, so the CLI mirrors the NCCR_GUARD_* env vars exactly."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"NCCR_GUARD_{name.upper()}"
        help_ = f"{field.description or name.replace('_', ' ')} (env {env})"
        ann = field.annotation
        if ann is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif get_origin(ann) is list:  # folders: `--add-model A B` and `--add-model A --add-model B` alike
            p.add_argument(flag, nargs="+", action="extend", type=Path, default=None, metavar="DIR", help=help_)
        else:
            choices = [a for a in get_args(ann) if isinstance(a, str)] if get_args(ann) else None
            if choices and all(isinstance(a, str) for a in get_args(ann)):
                p.add_argument(flag, choices=choices, default=None, help=help_)
            else:
                p.add_argument(flag, default=None, help=help_)


def _schedule_setting(text: str) -> str:
    """Parse at argument time (exit 2 with the reason), keep the text: Detector.load picks each model's entry."""
    from nccr_guard.engine.variants import parse_schedules

    try:
        parse_schedules(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def cmd_serve(args: argparse.Namespace) -> int:
    from nccr_guard.server.run import run

    return run(settings_from_args(args))


def cmd_score(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from nccr_guard.detector import Detector
    from nccr_guard.inputs import InputError, decode, sniff_modality
    from nccr_guard.manifest import ManifestError, load_manifest

    # Without --model, each file goes to the first default model of its modality (image -> mnist, audio -> speaker).
    folders, names = {}, set()
    for folder in [args.model] if args.model else default_models():
        manifest = load_manifest(folder)
        if manifest.modality not in folders:
            folders[manifest.modality] = folder
            names.add(manifest.name)
    if args.sequential_schedule:
        from nccr_guard.engine.variants import unknown_schedule_names

        if unknown := unknown_schedule_names(args.sequential_schedule, names):
            print(
                f"nccr-guard: error: --sequential-schedule names {', '.join(unknown)}, "
                f"not among {', '.join(sorted(names))}",
                file=sys.stderr,
            )
            return 2
    loaded: dict[str, Detector] = {}

    def detector_for(data: bytes) -> Detector:
        modality = sniff_modality(data) if not args.model else next(iter(folders))
        if modality not in folders:
            raise InputError(f"no {modality} model among {', '.join(map(str, default_models()))}", 415)
        if modality not in loaded:
            loaded[modality] = Detector.load(
                folders[modality],
                backend=args.backend,
                device=args.device,
                k=args.k,
                seed=args.seed,
                sequential=args.sequential,
                schedule=args.sequential_schedule,
                truncate=args.truncate,
                fuse=args.fuse,
            )
        return loaded[modality]

    failed = 0
    for file in tqdm(args.files, desc="score", unit="file", disable=len(args.files) < 20, leave=False):
        try:
            data = Path(file).read_bytes()
            det = detector_for(data)
            x = decode(data, det.manifest)
        except (OSError, InputError, ManifestError) as e:
            print(f"nccr-guard: error: {file}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
            failed += 1
            continue
        v = det.detect([x])[0]
        print(
            json.dumps(
                {
                    "file": str(file),
                    "model": det.manifest.name,
                    "verdict": v.verdict,
                    "score": round(v.score, 6),
                    "threshold": round(v.threshold, 6),
                    "p_value": round(v.p_value, 6),
                    "ood": v.ood,
                    "prediction": {"index": v.index, "label": v.label, "confidence": round(v.confidence, 6)},
                    "passes": v.passes,
                }
            ),
            flush=True,
        )
    return 1 if failed else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from nccr_guard.calibrate import calibrate

    c = calibrate(
        args.model,
        data=args.data,
        split=args.split,
        variant=args.variant,
        k=args.k,
        target_fpr=args.target_fpr,
        seed=args.seed,
        backend=args.backend,
    )
    print(
        json.dumps(
            {
                "model": str(args.model),
                "variant": c.variant,
                "threshold": c.threshold,
                "target_fpr": c.target_fpr,
                "n_clean": c.meta["n_clean"],
                "robustness_nccr": c.robustness,
            }
        )
    )
    return 0


def cmd_robustness(args: argparse.Namespace) -> int:
    from nccr_guard.calibrate import robustness

    print(json.dumps(robustness(args.model, data=args.data, split=args.split, backend=args.backend)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nccr_guard.eval.attacks import attacks_of
    from nccr_guard.eval.harness import evaluate
    from nccr_guard.manifest import load_manifest

    if args.data is not None and args.variant:
        raise ValueError(
            "--variant with --data: calibrate that variant first (nccr-guard calibrate --variant V --data FOLDER)"
        )
    if args.data is not None and args.split:
        raise ValueError("--split names a model.toml split; with --data, half of the data are held out instead")
    attacks = args.attacks
    if args.families:
        attacks = [*(attacks or []), *(a for a in attacks_of(args.families) if a not in (attacks or []))]
    evaluate(
        args.model,
        attacks=attacks,
        n=args.n,
        seed=args.seed,
        out=args.out or Path("reports") / load_manifest(args.model).name,
        split=args.split or "test",
        variant=args.variant,
        command=" ".join(["nccr-guard", *sys.argv[1:]]),
        calib_n=args.calib_n,
        data=args.data,
    )
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from nccr_guard.layers import candidate_layers
    from nccr_guard.manifest import load_manifest

    manifest = load_manifest(args.model)
    backend, layers = candidate_layers(manifest, args.backend)
    if args.json:
        for layer in layers:
            print(json.dumps({"backend": backend, **asdict(layer)}))
        return 0
    width = max([len(x.name) for x in layers] + [4])
    print(f"{manifest.name}: {len(layers)} {backend} layers ('*': watched now, model.toml watch)")
    print(f"  {'name':<{width}}  {'op':<16} {'shape':<22} neurons")
    for x in layers:
        shape = "[" + ", ".join(map(str, x.shape)) + "]"
        print(f"{'*' if x.watched else ' '} {x.name:<{width}}  {x.op:<16} {shape:<22} {x.neurons or '?'}")
    if missing := [w for w in manifest.watch if w not in {x.name for x in layers}]:
        print(f"watched but not a {backend} layer of this model: {', '.join(missing)}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from nccr_guard.eval.search import search

    search(args.model, n=args.n, seed=args.seed, out=args.out, attacks=tuple(args.attacks), start_from=args.start_from)
    return 0


def cmd_lofo(args: argparse.Namespace) -> int:
    from nccr_guard.eval.lofo import study

    study(args.model, n=args.n, seed=args.seed, out=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="nccr-guard", description="Detect adversarial inputs by neuron cover change rate."
    )
    ap.add_argument("--version", action="version", version=f"nccr-guard {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "serve",
        help="run the HTTP detection service",
        description="Run the HTTP detection service. Every flag mirrors an NCCR_GUARD_* environment variable.",
    )
    _add_settings_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "score",
        help="score image/audio files, one JSON line each",
        description="Score files; prints one JSON object per input.",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    _add_model_flags(p, by_type=True)
    p.description += " Without --model, images go to the default image model and audio to the default audio model."
    p.add_argument("--k", type=int, default=None, help="noise copies per family (default: calibrated K)")
    p.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stop drawing noise copies once the verdict is settled (default: on where the variant has a schedule)",
    )
    p.add_argument(
        "--sequential-schedule",
        default=None,
        type=_schedule_setting,
        metavar="[NAME=]FIRST/STEP/Z",
        help="sequential schedule instead of the variant's, for a model that draws noise copies: first/step/z with "
        "optional per-family firsts, e.g. '1 (sweep 3)/1/1.5', or 'NAME=LABEL; ...' per model (docs/nccr.md)",
    )
    p.add_argument(
        "--truncate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run perturbed copies only as deep as the verdict reads them (default: on; exact)",
    )
    p.add_argument(
        "--fuse",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rows, forward and scoring as one graph for nccr-v3-kind variants, on ONNX and on torch with CUDA "
        "(default: on)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "calibrate",
        help="fit neuron selection, thresholds and the verdict threshold",
        description="Fit a model folder's calibration.npz from clean data.",
    )
    _add_model_flags(p, backend=False)
    p.add_argument("--backend", choices=["torch", "onnx", "auto"], default="auto")
    p.add_argument("--data", type=Path, default=None, help="folder of clean images/clips (default: the manifest split)")
    p.add_argument(
        "--split",
        default=None,
        help="manifest splits to use without --data, comma-separated (default: model.toml [split] calibrate, "
        "else calib)",
    )
    p.add_argument("--variant", default=None, help="NCCR variant (default: the manifest's)")
    p.add_argument("--k", type=int, default=None, help="noise copies per family")
    p.add_argument("--target-fpr", type=float, default=0.05, help="false-positive rate on clean data (default 0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "robustness", help="model-level NCCR over clean data (lower = more stable; a coarse robustness rating)"
    )
    _add_model_flags(p, backend=False)
    p.add_argument("--backend", choices=["torch", "onnx", "auto"], default="auto")
    p.add_argument("--data", type=Path, default=None, help="folder of clean inputs (default: the manifest split)")
    p.add_argument("--split", default="test")
    p.set_defaults(func=cmd_robustness)

    p = sub.add_parser("evaluate", help="attack held-out inputs with ART and report detection vs baselines")
    _add_model_flags(p, backend=False)
    p.add_argument("--attacks", nargs="+", default=None, help="attack names (default: all)")
    p.add_argument(
        "--families",
        nargs="+",
        default=None,
        metavar="FAMILY",
        help="every attack of these families (image: linf l2 l1 l0 score_bb decision_bb), besides --attacks",
    )
    p.add_argument("--n", type=int, default=500, help="held-out inputs to attack (default %(default)s)")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="labelled inputs instead of model.toml's [split]: a folder of one subfolder per label (named as in "
        "model.toml's labels, or by index) of image or audio files, or an .npz of x and y; every second input of "
        "each label is attacked, the rest set the baselines' thresholds (docs/model-format.md). Use inputs the "
        "calibration did not see",
    )
    p.add_argument("--split", default=None, help="model.toml split to attack (default: test)")
    p.add_argument("--variant", default=None, help="NCCR variant to evaluate (default: the calibrated one)")
    p.add_argument(
        "--calib-n", type=int, default=None, help="calib inputs for the baselines' thresholds (default: all)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="report folder (default: reports/<model name>)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "layers",
        help="list a model's layers that model.toml's watch can name, with shapes and which are watched",
        description="List the layers of a model folder's network that `watch` in model.toml can name: ONNX tensor "
        "names (the ONNX backend) or torch module names (torch), with the operator, the shape (batch axis first) "
        "and the neurons NCCR reads (channels of a conv map or a sequence, else the flattened size); '*' marks "
        "those watched now. Watch a layer or two before the logits, e.g. the last hidden activation "
        "(docs/model-format.md).",
    )
    p.add_argument("--model", type=Path, default=_model_default(), help="model folder (default: %(default)s)")
    p.add_argument(
        "--backend",
        choices=["torch", "onnx", "auto"],
        default="auto",
        help="whose names to list (default auto: ONNX where model.toml names an ONNX file, else torch)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per layer")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("search", help="the NCCR formulation search on the dev split (worst case over --attacks)")
    _add_model_flags(p, backend=False)
    p.add_argument("--attacks", nargs="+", default=["fgsm"], help="dev attacks to rank by (worst case over them)")
    p.add_argument(
        "--start-from",
        metavar="VARIANT",
        help="start the greedy max-combinations from this variant's components (e.g. nccr-v3): what adding one "
        "more component to it would buy",
    )
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("reports/search"))
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "lofo",
        help="leave-one-family-out search on the dev split: each method judged by the attack family it never saw",
    )
    _add_model_flags(p, backend=False)
    p.add_argument("--n", type=int, default=200, help="dev inputs to attack (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("reports/search/lofo"))
    p.set_defaults(func=cmd_lofo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    from nccr_guard.backends import BackendError
    from nccr_guard.inputs import InputError
    from nccr_guard.manifest import ManifestError

    try:
        return int(args.func(args) or 0)
    except ValidationError as e:  # settings from flags and NCCR_GUARD_* env vars: one line per bad field
        for err in e.errors():
            field, *item = map(str, err["loc"] or ("settings",))  # item: a list entry's position
            flag = f"--{field.replace('_', '-')} / NCCR_GUARD_{field.upper()}" + "".join(f" [{i}]" for i in item)
            print(f"nccr-guard: error: {flag}: {err['msg']} (got {err.get('input')!r})", file=sys.stderr)
        return 2
    except (ManifestError, BackendError, InputError, ValueError, FileNotFoundError, OSError) as e:
        print(f"nccr-guard: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
