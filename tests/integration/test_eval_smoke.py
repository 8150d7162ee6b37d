"""The evaluation harness end to end on 16 held-out digits: every attack but one, every detector, the files and
the eval.json schema other tools read. 16 rather than 40 digits: ART's two Carlini-Wagner runs cost ~1.5 s a digit
here and were 105 of the test's 139 s; at 16 the test took ~77 s, 60 % of it in CW (py-spy), so the smoke runs
one CW (confidence 0) and leaves cw_l2_conf10, the same attack at confidence 10, to `make eval`."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import BIN, MNIST

DETECTORS = {"nccr", "prediction_flip", "feature_squeezing", "low_margin"}
# The first attack table's attacks, each family's other attacks having their own smoke (test_attack_families.py).
SMOKE = ("fgsm", "pgd", "pgd_minimal", "cw_l2", "deepfool", "pgd_highconf")


def test_harness_smoke(tmp_path):
    out = tmp_path / "report"
    r = subprocess.run(
        [str(BIN), "evaluate", "--model", str(MNIST), "--out", str(out)]
        + ["--n", "16", "--calib-n", "200", "--seed", "0"]
        + ["--attacks", *SMOKE],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name for p in out.iterdir()} >= {"eval.json", "eval.md", "roc.png", "scores.png"}
    ev = json.loads((out / "eval.json").read_text())
    assert {"model", "variant", "command", "seed", "n_clean", "attacks"} <= set(ev)
    assert ev["model"] == "mnist" and ev["seed"] == 0 and ev["n_clean"] >= 14
    assert set(ev["attacks"]) == {"fgsm", "pgd", "pgd_minimal", "cw_l2", "deepfool", "pgd_highconf"}
    for name, a in ev["attacks"].items():
        assert {"params", "family", "strength", "success_rate", "n_adversarial", "detectors"} <= set(a), name
        assert a["family"] in ("linf", "l2") and a["strength"] in ("minimal", "high")
        assert 0 <= a["success_rate"] <= 1
        if a["n_adversarial"]:
            assert set(a["detectors"]) == DETECTORS
            for d in a["detectors"].values():
                assert 0 <= d["auroc"] <= 1 and 0 <= d["tpr_at_fpr05"] <= 1
    assert ev["attacks"]["deepfool"]["n_adversarial"] >= 14
    assert ev["attacks"]["deepfool"]["detectors"]["nccr"]["auroc"] > 0.9
    assert "| deepfool |" in (out / "eval.md").read_text()
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_level_candidates_are_rates_that_grow_with_the_noise():
    """The robustness study's candidate measures on the shipped model: every candidate is measured, rates stay in
    [0, 1], and the decision neuron moves further under stronger noise of either family."""
    from nccr_guard.eval.robustness_study import CANDIDATES, candidate_values

    vals = candidate_values(MNIST, seed=0)
    assert set(vals) == {c.name for c in CANDIDATES}
    for name, v in vals.items():
        assert v >= 0, name
        if name.startswith(("flip", "pred_flip")):
            assert v <= 1, name
    for family, weak, strong in (("gaussian", 0.1, 0.3), ("uniform", 0.1, 0.2)):
        assert vals[f"margin[logits/all]@{family}:{strong}/mean"] > vals[f"margin[logits/all]@{family}:{weak}/mean"]
    assert vals["flip[*/class]@bitdepth:1/mean"] > 0  # 1-bit squeezing moves some class neurons across


def test_clean_fpr_checks_thresholds_on_held_out_digits(tmp_path, digit_pngs, mnist_v3):
    """A copy calibrated on two splits at a 20 % target, scored beside the model's own 5 % calibration on the
    same held-out digits: each flags about its target, and the looser one more. A folder of PNGs counts too.
    MNIST as nccr-v3: nccr-v4 fits on the dev split's attacks, which this calibration takes as clean data."""
    import shutil

    folder = tmp_path / "mnist"
    shutil.copytree(mnist_v3, folder)
    r = subprocess.run(
        [str(BIN), "calibrate", "--model", str(folder), "--split", "calib,dev", "--target-fpr", "0.2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["n_clean"] == 1250
    out = tmp_path / "fpr"
    r = subprocess.run(
        [str(BIN.parent / "python"), "-m", "nccr_guard.eval.clean_fpr", "--model", str(mnist_v3), "--splits", "test"]
        + ["--data", str(digit_pngs[0][0].parent)]
        + ["--calibration", f"loose={folder / 'calibration.npz'}", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "clean-fpr.json").read_text())
    assert rep["calibrations"]["loose"]["data"] == "split:calib,dev"
    assert rep["calibrations"]["loose"]["n_clean"] == 1250 and rep["calibrations"]["loose"]["target_fpr"] == 0.2
    test, pngs = rep["splits_detail"]["test"], rep["splits_detail"][str(digit_pngs[0][0].parent)]
    assert test["n"] == 500 and 480 <= test["correct"] <= 500
    assert pngs["n"] == pngs["correct"] == len(list(digit_pngs[0][0].parent.glob("*.png")))
    model, loose = rep["pooled"]["model/fixed"]["correct"], rep["pooled"]["loose/fixed"]["correct"]
    for r_ in (model, loose):
        assert r_["n"] == test["correct"] + pngs["n"] and r_["fpr"] == r_["flagged"] / r_["n"]
        assert r_["ci95"][0] <= r_["fpr"] <= r_["ci95"][1]
    assert model["fpr"] < 0.12 and 0.1 < loose["fpr"] < 0.32 and loose["flagged"] > model["flagged"]
    md = (out / "clean-fpr.md").read_text()
    assert md.count("| **pooled** |") == 2 and "| split: all clean inputs |" in md
    everything = rep["pooled"]["model/fixed"]["all"]  # misclassified digits count here, as in the calibration
    assert everything["n"] == test["n"] + pngs["n"] and everything["flagged"] >= model["flagged"]
