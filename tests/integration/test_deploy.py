"""Deployment files checked by the real tools: Prometheus scraping a real server, promtool, the Kubernetes
OpenAPI schemas, the compose schema and hadolint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT, free_port

DEPLOY = ROOT / "deploy"
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name) or (str(VENV_BIN / name) if (VENV_BIN / name).exists() else None)
    assert path, f"{name} not found: `make test` installs it (Debian package prometheus / the dev extra)"
    return path


def promql_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\bnccr_guard_[a-z_]+", expr))


def dashboard_and_alert_metrics() -> set[str]:
    dash = json.loads((DEPLOY / "grafana/dashboards/nccr-guard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"]]
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return set().union(*(promql_metrics(e) for e in exprs))


def test_promtool_accepts_config_and_rules():
    for args in (
        ["check", "config", str(DEPLOY / "prometheus/prometheus.yml")],
        ["check", "rules", str(DEPLOY / "prometheus/alerts.yml")],
    ):
        r = subprocess.run([tool("promtool"), *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_every_metric_in_dashboard_and_alerts_is_exported(server, digit_pngs):
    with server.client() as c:
        c.post("/v1/detect", content=digit_pngs[0][0].read_bytes(), headers={"content-type": "image/png"})
        text = c.get("/metrics").text
    exported = set(re.findall(r"^(nccr_guard_[a-z_]+)", text, re.M))
    used = dashboard_and_alert_metrics()
    assert len(used) >= 10
    assert used <= exported, used - exported


def test_real_prometheus_scrapes_the_service(server, digit_pngs, tmp_path):
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"] = [{"targets": [server.url.removeprefix("http://")]}]
    shutil.copy(DEPLOY / "prometheus/alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prom = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'db'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prom.log").open("w"),
    )
    try:
        with server.client() as c:
            for path, _ in digit_pngs[:10]:
                assert (
                    c.post("/v1/detect", content=path.read_bytes(), headers={"content-type": "image/png"}).status_code
                    == 200
                )
        api = f"http://127.0.0.1:{port}/api/v1/query"
        queries = {
            "histogram": 'sum(nccr_guard_request_duration_seconds_count{endpoint="/v1/detect"})',
            "verdicts": 'sum(nccr_guard_verdicts_total{model="mnist"})',
            "p99": "histogram_quantile(0.99, sum by (le) (nccr_guard_request_duration_seconds_bucket"
            '{endpoint="/v1/detect"}))',
        }
        got: dict[str, float] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(got) < len(queries):
            for name, q in queries.items():
                try:
                    res = httpx.get(api, params={"query": q}, timeout=2).json()["data"]["result"]
                except (httpx.HTTPError, KeyError, ValueError):
                    continue
                if res and float(res[0]["value"][1]) > 0:
                    got[name] = float(res[0]["value"][1])
            time.sleep(0.5)
        assert set(got) == set(queries), (got, (tmp_path / "prom.log").read_text()[-1500:])
        assert got["histogram"] >= 10 and got["verdicts"] >= 10 and 0 < got["p99"] < 10
    finally:
        prom.terminate()
        prom.wait(10)


def test_kubernetes_manifests_validate():
    files = sorted(str(p) for p in (DEPLOY / "k8s").rglob("*.yaml"))
    assert len(files) >= 3
    r = subprocess.run([tool("kubernetes-validate"), "--strict", *files], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    kinds = {d["kind"] for f in files for d in yaml.safe_load_all(Path(f).read_text()) if d}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds


def test_every_setting_named_in_deploy_files_exists():
    """An NCCR_GUARD_* variable the settings class does not know is ignored silently (extra="ignore"), so a
    misspelt one in a manifest would deploy the default without a word."""
    from nccr_guard.config import Settings

    known = {f"NCCR_GUARD_{name.upper()}" for name in Settings.model_fields}
    files = [*(DEPLOY / "k8s").rglob("*.yaml"), ROOT / "docker-compose.yml", ROOT / "Dockerfile"]
    named = {(f.name, v) for f in files for v in re.findall(r"\bNCCR_GUARD_[A-Z0-9_]+", f.read_text())}
    assert {v for _, v in named} >= {"NCCR_GUARD_DEVICE", "NCCR_GUARD_PROCESSES"}
    assert not {(f, v) for f, v in named if v not in known}


def test_compose_file_validates():
    r = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_passes_hadolint():
    r = subprocess.run(
        [tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_dockerfile_targets_and_hygiene(target):
    text = (ROOT / "Dockerfile").read_text()
    stage = text.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
    assert "USER 10001" in stage and 'ENTRYPOINT ["nccr-guard", "serve"]' in stage and "HEALTHCHECK" in stage
    assert "/v2/health/live" in stage
    deps = text.split(f" AS {target}-deps\n", 1)[1].split("\nFROM ", 1)[0]
    assert ("onnxruntime-gpu" not in deps) if target == "cpu" else ('".[gpu]"' in deps and '".[cpu]"' not in deps)


def test_the_image_healthcheck_follows_the_server_to_https(tmp_path):
    """The Dockerfile's HEALTHCHECK command, run as Docker would (exec form, the image's env): with
    NCCR_GUARD_SSL_CERTFILE set it probes over HTTPS and passes; without it, plain HTTP to a TLS server fails (so
    the scheme really follows the variable), as it does with nothing listening."""
    from tests.conftest import MNIST, issue_tls, start_server

    text = (ROOT / "Dockerfile").read_text()
    found = re.findall(r"HEALTHCHECK [^\n]*\\\n\s+CMD (\[.*\])", text)
    assert len(found) == 2 and len(set(found)) == 1, found
    command = json.loads(found[0])
    cert, key, ca = issue_tls(tmp_path)
    s = start_server(tmp_path, "--models", str(MNIST), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), ca=ca)
    port = s.url.rsplit(":", 1)[1]
    base = {"PATH": "/usr/bin:/bin", "NCCR_GUARD_PORT": port}

    def probe(**env: str) -> int:
        return subprocess.run(command, env={**base, **env}, capture_output=True, timeout=30).returncode

    try:
        assert probe(NCCR_GUARD_SSL_CERTFILE="/app/cert.pem") == 0
        assert probe() != 0
    finally:
        s.stop_cleanly()
    assert probe(NCCR_GUARD_SSL_CERTFILE="/app/cert.pem") != 0  # nothing listens now
