"""Schema fuzzing: schemathesis generates requests from the live OpenAPI spec of a real server on loopback and
checks that none gets a 5xx and every response conforms to the documented schema, status codes and content types.

CI runs a short, seeded pass; `make fuzz` a longer one (NCCR_GUARD_FUZZ_EXAMPLES). schemathesis keeps state
between runs (its crash cache, by default `.schemathesis/` under the working directory, and hypothesis's example
database): here it all goes under the test's tmp path, named in a config file there, and `st` runs from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import start_server

ST = Path(sys.executable).parent / "st"
CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    )
)


@pytest.mark.skipif(not ST.exists(), reason="schemathesis is in the dev extra")
def test_openapi_fuzz(tmp_path):
    examples = os.environ.get("NCCR_GUARD_FUZZ_EXAMPLES", "12")
    state = tmp_path / "schemathesis"
    state.mkdir()
    config = state / "schemathesis.toml"
    config.write_text(f'[cache]\ndirectory = "{state / "cache"}"\n\n[generation]\ndatabase = "{state / "examples"}"\n')
    server = start_server(tmp_path, "--models", str(Path(__file__).parents[2] / "models" / "mnist"))
    try:
        r = subprocess.run(
            [str(ST), "--config-file", str(config), "run", f"{server.url}/openapi.json", "--checks", CHECKS]
            + ["--max-examples", examples, "--seed", "1", "--request-timeout", "30", "--workers", "1", "--no-color"],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=state,
        )
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
        assert server.client().get("/v2/health/ready").status_code == 200
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()
