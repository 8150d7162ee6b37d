"""The speaker model's bench (bare loops and the server at saturation, as `bench.serve` measures them) for this
checkout and another, run alternately: a change to the engine moves the bare loop too, so both sides must run
their own code (`bench.batch_size --compare` runs only the other checkout's server).

    python -m bench.speaker_compare --compare OTHER_CHECKOUT [--rounds 2] [--seconds 8]

Each round runs `bench.serve.speaker` of each checkout in a fresh interpreter whose PYTHONPATH holds that
checkout's `service/` and bench code. Writes reports/bench/speaker-compare-<other commit>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT, checkout_env, compare_suffix, write_report

RUN = "import json, sys; import bench.serve as s; print(json.dumps(s.speaker(float(sys.argv[1]), [])))"


def one(checkout: Path, seconds: float) -> dict:
    env = checkout_env(checkout / "service")
    env["PYTHONPATH"] += f":{checkout}"
    r = subprocess.run(
        [sys.executable, "-c", RUN, str(seconds)], cwd=checkout, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", type=Path, required=True, help="the other checkout (a git worktree)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=8)
    a = ap.parse_args()
    rows = []
    for rnd in range(a.rounds):
        for name, checkout in (("this checkout", ROOT), (str(a.compare), a.compare.resolve())):
            got = one(checkout, a.seconds)
            row = {
                "round": rnd + 1,
                "checkout": name,
                "bare_best_det_per_s": got["bare_best"]["detections_per_s"],
                "service_peak_verdicts_per_s": got["service_peak_rps"],
                "ratio": round(got["ratio_service_vs_best_bare"], 3),
                "bare": got["bare"],
                "service_saturation": got["service_saturation"],
            }
            rows.append(row)
            print(
                f"round {rnd + 1} {name}: bare {row['bare_best_det_per_s']:.2f} det/s, server "
                f"{row['service_peak_verdicts_per_s']:.2f} verdicts/s, ratio {row['ratio']:.3f}",
                flush=True,
            )
    cmd = f"python -m bench.speaker_compare --compare {a.compare} --rounds {a.rounds} --seconds {a.seconds:g}"
    path = write_report(f"speaker{compare_suffix(a.compare)}", {"seconds": a.seconds, "runs": rows}, cmd)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
