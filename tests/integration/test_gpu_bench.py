"""bench/gpu.py runs on a lent GPU machine a few times a year, with minutes to spare: its steps run here on the
CPU so that the script has not rotted by then (a lent run has worked first time after such smoke runs)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_bench_steps_run_on_the_cpu(tmp_path):
    steps = ["correctness", "onnx_runtime", "engine_profile"]
    r = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--device", "cpu", "--only", *steps, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    [path] = tmp_path.glob("gpu-*.json")
    report = json.loads(path.read_text())
    assert report["command"].startswith("python -m bench.gpu") and report["machine"]["cores"] >= 1
    for step in steps:
        assert "error" not in report[step], report[step]
    for precision in ("fp32", "fp16"):  # on the CPU both are the same fp32 forward: identical verdicts
        assert report["correctness"][precision]["same_verdict"] == 1.0
        assert report["correctness"][precision]["cuda_graphs"] is False
    assert "CPUExecutionProvider" in report["onnx_runtime"]["providers"]
    for per in ("1_inputs", "32_inputs"):
        prof = report["engine_profile"][per]
        assert prof["wall_ms_per_detect"] > 0 and prof["host_ops_ms_per_detect"] > 0
        assert any("conv" in op["op"] for op in prof["top_ops_by_host_time"])
