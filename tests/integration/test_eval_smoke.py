"""The evaluation harness end to end on a few dozen held-out digits: every attack, every detector, the files
and the eval.json schema other tools read."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import BIN, MNIST

DETECTORS = {"nccr", "prediction_flip", "feature_squeezing", "low_margin"}


def test_harness_smoke(tmp_path):
    out = tmp_path / "report"
    r = subprocess.run(
        [str(BIN), "evaluate", "--model", str(MNIST), "--n", "40", "--seed", "0", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name for p in out.iterdir()} >= {"eval.json", "eval.md", "roc.png", "scores.png"}
    ev = json.loads((out / "eval.json").read_text())
    assert {"model", "variant", "command", "seed", "n_clean", "attacks"} <= set(ev)
    assert ev["model"] == "mnist" and ev["seed"] == 0 and ev["n_clean"] >= 35
    assert set(ev["attacks"]) == {"fgsm", "pgd", "pgd_minimal", "cw_l2", "deepfool", "pgd_highconf", "cw_l2_conf10"}
    for name, a in ev["attacks"].items():
        assert {"params", "success_rate", "n_adversarial", "detectors"} <= set(a), name
        assert 0 <= a["success_rate"] <= 1
        if a["n_adversarial"]:
            assert set(a["detectors"]) == DETECTORS
            for d in a["detectors"].values():
                assert 0 <= d["auroc"] <= 1 and 0 <= d["tpr_at_fpr05"] <= 1
    assert ev["attacks"]["deepfool"]["n_adversarial"] >= 30
    assert ev["attacks"]["deepfool"]["detectors"]["nccr"]["auroc"] > 0.9
    assert "| deepfool |" in (out / "eval.md").read_text()
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
