"""The `nccr-guard` console script as a user runs it, on real PNG files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import BIN, MNIST


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout)


def test_score_predicts_held_out_digits(digit_pngs):
    r = run("score", "--model", str(MNIST), *(str(p) for p, _ in digit_pngs))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) == len(digit_pngs)
    correct = sum(o["prediction"]["index"] == label for o, (_, label) in zip(lines, digit_pngs, strict=True))
    assert correct / len(lines) >= 0.95
    for o in lines:
        assert o["verdict"] in ("clean", "adversarial") and o["model"] == "mnist" and o["passes"] > 1
        assert set(o) >= {"file", "score", "threshold", "prediction"}
    assert sum(o["verdict"] == "clean" for o in lines) / len(lines) >= 0.85


def test_corrupt_and_missing_files_fail_cleanly(tmp_path, digit_pngs):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(digit_pngs[0][0].read_bytes()[:60])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    r = run("score", str(digit_pngs[0][0]), str(corrupt), str(text), str(tmp_path / "missing.png"))
    assert r.returncode == 1
    assert len(r.stdout.splitlines()) == 1  # the good file still scored
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("nccr-guard: error: ") for e in errors)
    assert "Traceback" not in r.stderr


def test_wrong_model_folder_is_one_line(tmp_path):
    r = run("score", "--model", str(tmp_path), "x.png")
    assert r.returncode == 2 and "no model.toml" in r.stderr and "Traceback" not in r.stderr


def test_bad_settings_are_one_line_each_naming_flag_and_env():
    r = subprocess.run(
        [str(BIN), "serve", "--port", "abc", "--processes", "0", "--root-path", "guard/", "--ssl-keyfile", __file__],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NCCR_GUARD_MAX_QUEUE": "x"},
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 5 and "Traceback" not in r.stderr
    assert {line.split(":")[1].strip() for line in lines} == {"error"}
    for flag in (
        "--port / NCCR_GUARD_PORT",
        "--root-path / NCCR_GUARD_ROOT_PATH",
        "--ssl-keyfile / NCCR_GUARD_SSL_KEYFILE",  # a key without its certificate
        "--processes / NCCR_GUARD_PROCESSES",
        "--max-queue / NCCR_GUARD_MAX_QUEUE",
    ):
        assert sum(flag in line for line in lines) == 1, r.stderr


def test_help_on_every_command():
    for cmd in ("serve", "score", "calibrate", "robustness", "evaluate", "search"):
        r = run(cmd, "--help")
        assert r.returncode == 0 and "usage: nccr-guard" in r.stdout
    assert "NCCR_GUARD_MAX_BATCH" in run("serve", "--help").stdout


def test_calibrate_and_robustness_on_a_copy(tmp_path):
    folder = tmp_path / "mnist"
    shutil.copytree(MNIST, folder)
    # nccr-v3: the served nccr-v4 would first attack the dev split for its combiner's fit (tens of minutes).
    r = run("calibrate", "--model", str(folder), "--variant", "nccr-v3", "--target-fpr", "0.1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["target_fpr"] == 0.1 and out["n_clean"] == 750
    r = run("robustness", "--model", str(folder))
    assert r.returncode == 0, r.stderr
    rob = json.loads(r.stdout)
    assert 0.0 < rob["nccr"] < 0.5 and rob["n"] == 500
    # The model-level NCCR reads rows the verdict never makes (Gaussian copies): calibration forwards them apart,
    # and gives the same number as `robustness` on the same inputs.
    assert rob["measure"] == "margin[logits/all]@gaussian:0.1/mean"
    r = run("robustness", "--model", str(folder), "--split", "calib")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["nccr"] == pytest.approx(out["robustness_nccr"], rel=1e-9)


def test_opt_in_median_variant_calibrates_and_scores(tmp_path, digit_pngs):
    """`nccr-v3-median` (nccr-v3 plus a 2x2 median filter, docs/nccr.md): a user opts in by calibrating their copy
    with it; score then forwards five rows per digit (nccr-v3: four) and still passes clean digits."""
    folder = tmp_path / "mnist"
    shutil.copytree(MNIST, folder)
    r = run("calibrate", "--model", str(folder), "--variant", "nccr-v3-median")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["variant"] == "nccr-v3-median"
    r = run("score", "--model", str(folder), *(str(p) for p, _ in digit_pngs))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert {o["passes"] for o in lines} == {5}
    assert sum(o["verdict"] == "clean" for o in lines) / len(lines) >= 0.85
