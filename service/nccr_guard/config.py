"""The one settings class. Env vars `NCCR_GUARD_*`; the CLI flags of `nccr-guard serve` mirror the fields.

Built by the app factory or the CLI, never at import time, so tests can make as many as they like.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, FilePath, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_MODELS = Path(__file__).resolve().parents[2] / "models"
DEFAULT_NAMES = ("mnist", "photo", "speaker")  # an image without `model` goes to mnist


def default_models() -> list[Path]:
    """The embedded default model folders: from the source checkout, else ./models (the container's /app)."""
    for root in (REPO_MODELS, Path.cwd() / "models"):
        found = [root / n for n in DEFAULT_NAMES if (root / n / "model.toml").exists()]
        if found:
            return found
    return []


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NCCR_GUARD_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface, as in the images)")
    port: int = Field(8000, description="port to listen on")
    root_path: str = Field(
        "",
        description="the path prefix a reverse proxy serves this under and strips before forwarding (e.g. /guard): "
        "/docs and the OpenAPI schema link through it, the access log shows it; routes answer without it",
    )
    ssl_certfile: FilePath | None = Field(
        None, description="PEM certificate (chain) to serve HTTPS with, e.g. where no mesh or ingress terminates TLS"
    )
    ssl_keyfile: FilePath | None = Field(None, description="PEM private key of --ssl-certfile", validate_default=True)
    forwarded_allow_ips: str = Field(
        "127.0.0.1,::1",
        description="proxies (comma-separated addresses or networks, or *) whose X-Forwarded-For and "
        "X-Forwarded-Proto are believed: the access log's client is then the address the proxy saw",
    )
    models: Annotated[list[Path], NoDecode] = Field(
        default_factory=default_models,
        description="model folders to serve, instead of the default ones (env: comma-separated)",
    )
    add_model: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="a model folder to serve besides --models (by default: besides the default models); repeat "
        "the flag for more (env: comma-separated)",
    )
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="server processes, each loading the models, on one port (SO_REUSEPORT; docs/performance.md)",
    )
    worker_timeout_s: float = Field(
        30.0,
        gt=0,
        description="with --processes N: a worker whose event loop gives no heartbeat for this long is killed and "
        "replaced",
    )
    rebalance_connections: bool = Field(
        True,
        description="with --processes N: a worker holding more than its share of the open connections closes one "
        "after its response (at most one per 0.2 s), so that the kernel's hash re-spreads few long-lived "
        "keep-alive connections",
    )
    backend: Literal["torch", "onnx", "auto"] = Field(
        "auto",
        description="auto: ONNX Runtime on the CPU where the model folder has an ONNX file, else torch; a model "
        "without the named backend's weights is served on the other one",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the GPU if torch sees one")
    half: bool = Field(False, description="half precision on CUDA (torch backend)")
    cuda_graphs: bool = Field(
        True,
        description="replay captured CUDA graphs for forwards of up to 256 rows (torch backend on CUDA; each graph "
        "is checked against the eager forward once, and a failed check falls back to eager)",
    )
    max_batch: int = Field(0, ge=0, description="rows (passes) per forward; 0 = per-device default")
    max_delay_ms: float = Field(-1.0, description="batch gathering window; <0 = per-device default")
    max_queue: int = Field(256, ge=1, description="queued requests per model before 503")
    max_connections: int = Field(1024, ge=1, description="concurrent connections before uvicorn answers 503")
    request_timeout_s: float = Field(
        10.0,
        gt=0,
        description="from the moment a request reaches the app: reading its body, decoding and waiting for the "
        "verdict; past it 504",
    )
    api_key: str | None = Field(
        None,
        description="the key the API asks for, as X-API-Key or Authorization: Bearer (not the page and docs, nor "
        "health and metrics with --open-health); none: no key",
    )
    open_health: bool = Field(True, description="health and metrics need no API key")
    upstream: str | None = Field(
        None, description="sidecar mode: the classifier URL that POST /v1/guard forwards a scored request to"
    )
    upstream_timeout_s: float = Field(10.0, gt=0, description="how long the upstream has to answer; past it 504")
    on_adversarial: Literal["block", "tag"] = Field(
        "block", description="sidecar mode: block answers an adversarial input 422; tag forwards it too"
    )
    explain: bool = Field(
        True,
        description="serve POST /v1/explain, the page's breakdown of a score (each component's z-score and weight, "
        "the clean calibration score distribution, the perturbed copies); --no-explain where the detector's "
        "internals are not for clients to see (they help an adaptive attacker, docs/security.md): the page then "
        "shows the verdict only",
    )
    attack_demo: bool = Field(
        False,
        description="serve POST /v1/attack, which runs a small ART attack (PGD, 10 steps, the model's FGSM budget) on "
        "one uploaded image on the server, and show its button on the page: a visitor sees a clean / adversarial "
        "pair; image models with torch weights only, one attack at a time per model. Off: the route answers 404",
    )
    k: int | None = Field(None, ge=1, le=256, description="override the variant's noise copies")
    sequential: bool = Field(
        True,
        description="sequential testing: forward noise copies in rounds and stop once the verdict is settled "
        "(variants with a schedule only; --no-sequential always uses all K)",
    )
    sequential_schedule: str | None = Field(
        None,
        description="sequential schedule instead of the variant's: a label first/step/z with optional per-family "
        "firsts, e.g. '1 (sweep 3)/1/1.5' (three spread shifts first), for every served model that draws noise "
        "copies, or 'NAME=LABEL; ...' for named models (a bare label among them covers the rest; docs/nccr.md "
        "compares schedules by rows and AUROC loss against fixed K)",
    )
    truncate: bool = Field(
        True,
        description="run perturbed copies only up to the deepest layer the verdict reads from them (variants that "
        "read no logits of copies; exact, --no-truncate runs the whole network)",
    )
    fuse: bool = Field(
        True,
        description="run a verdict's rows, forward and scoring as one graph (variants of the nccr-v3 kind: bit-depth "
        "squeezes scored by logit margins): one ONNX Runtime graph, or with torch on CUDA one function replayed "
        "from a CUDA graph; checked against the numpy engine at load; --no-fuse scores in numpy around the forward)",
    )
    direct_routes: bool = Field(
        True,
        description="serve POST /v1/detect, /v1/detect/batch and KServe v2 infer with binary tensors beside "
        "FastAPI's routing and request handling instead of through them (same key check, work, answers and "
        "errors, less event-loop CPU per request: docs/performance.md); --no-direct-routes leaves them to the "
        "FastAPI routes",
    )
    gc_freeze: bool = Field(
        True,
        description="after start-up, exempt the objects alive then (models, libraries) from garbage collection, "
        "so that a full collection pauses the server for milliseconds (docs/performance.md)",
    )
    seed: int = Field(0, description="seed of the perturbations' random copies")
    max_upload_bytes: int = Field(10 * 1024 * 1024, description="largest request body; beyond it 413")
    max_pixels: int = Field(4096 * 4096, description="largest image, width x height; beyond it 413")
    max_audio_s: float = Field(30.0, description="longest audio clip, in seconds; beyond it 413")
    drain_s: float = Field(10.0, ge=0, description="grace period for queued work on SIGTERM")
    drain_quiet_s: float = Field(
        0.5,
        ge=0,
        description="on SIGTERM, keep listening (new requests get 503) until no connection or request has arrived "
        "for this long, within drain_s: a client that connects as the listener closes gets a reset, not an answer",
    )
    score_decimals: int = Field(4, ge=0, le=12, description="rounding of returned scores (limits probing)")
    log_json: bool = Field(
        True,
        description="service logs on stderr as JSON lines (--no-log-json: plain text); the access log is JSON "
        "either way",
    )
    access_log: bool = Field(
        True,
        description="one JSON line per request on stdout (request id, client, path, status, time, model, verdict, "
        "upload digest), written by a background thread; --no-access-log where a proxy logs requests already",
    )
    access_log_max_lines: int = Field(
        100_000,
        ge=1,
        description="access-log lines held in memory while stdout does not take them (a stalled log shipper; "
        "~300 bytes each); beyond them new lines are dropped and counted in nccr_guard_access_log_dropped_total",
    )
    cpus: int = Field(
        0,
        ge=0,
        description="CPUs this server may use, which set the CPU batch workers (one per CPU, at most 4, divided among "
        "processes); 0 = the CPUs the process may run on. A CPU quota (a Kubernetes limit, docker --cpus) is not "
        "among them: set this to the limit (deploy/k8s does, from the downward API)",
    )
    torch_threads: int = Field(0, ge=0, description="intra-op threads; 0 = torch default")

    @field_validator("models", "add_model", mode="before")
    @classmethod
    def _folders(cls, v: object) -> object:
        """An env var's text: a JSON list, or folders separated by commas."""
        if isinstance(v, str):
            return json.loads(v) if v.lstrip().startswith("[") else [p.strip() for p in v.split(",") if p.strip()]
        return v

    @property
    def served_models(self) -> list[Path]:
        """The folders to serve: --models (or the defaults), then each --add-model; one folder named twice once."""
        seen: dict[Path, Path] = {}
        for folder in [*self.models, *self.add_model]:
            seen.setdefault(folder.resolve(), folder)
        return list(seen.values())

    @field_validator("ssl_keyfile")
    @classmethod
    def _tls_needs_both(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if (v is None) != (info.data.get("ssl_certfile") is None) and "ssl_certfile" in info.data:
            raise ValueError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
        return v

    @field_validator("root_path")
    @classmethod
    def _root_path_is_a_prefix(cls, v: str) -> str:
        if v and (not v.startswith("/") or v.endswith("/")):
            raise ValueError("a path prefix starts with '/' and does not end with one, e.g. /guard")
        return v

    @field_validator("sequential_schedule")
    @classmethod
    def _schedule_parses(cls, v: str | None) -> str | None:
        """Fail at start-up, not at the first model load, on a schedule that does not parse."""
        if v is not None:
            from nccr_guard.engine.variants import parse_schedules

            parse_schedules(v)
        return v
