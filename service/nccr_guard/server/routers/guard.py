"""Sidecar mode: POST /v1/guard scores the upload, then forwards the unchanged request to the upstream
classifier (clean, or any verdict with on_adversarial=tag) and returns its answer with X-NCCR-* headers. A JSON
body is scored as the tensor it carries (a KServe v2 infer request, or `instances` rows; json_tensor).

Forwarded: the body byte for byte, the query string (after the upstream URL's own), and every request header
but the hop-by-hop ones (RFC 9110 7.6.1, those the Connection header names included), Host and Content-Length
(httpx sets both for the upstream), and the credential this server checked itself (X-API-Key, or an
`Authorization: Bearer` carrying this server's key), which is never the upstream's to see. So `Authorization`,
cookies and custom headers reach the upstream as the client sent them."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from nccr_guard.inputs import InputError
from nccr_guard.server.deps import Authorized, ServiceDep, deadline
from nccr_guard.server.routers.detect import ERRORS, UPLOAD_BODY, detect_upload, detection, refuse_if_full, settle
from nccr_guard.server.routers.v2 import MAX_V2_BATCH, in_range, request_tensor
from nccr_guard.server.runtime import ModelRuntime
from nccr_guard.server.schemas import Detection, V2InferRequest
from nccr_guard.server.state import Service
from nccr_guard.server.uploads import read_body, read_uploads

router = APIRouter(prefix="/v1", tags=["guard"], dependencies=[Authorized])

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "server", "date"}
NOT_FORWARDED = {
    *("connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"),
    *("proxy-authorization", "proxy-authenticate", "host", "content-length", "expect"),
}


def forwarded_headers(request: Request, api_key: str | None) -> list[tuple[str, str]]:
    """The request's headers as the upstream gets them (the module docstring says which are left out); repeated
    headers stay repeated, in order."""
    named = {h.strip().lower() for v in request.headers.getlist("connection") for h in v.split(",")}
    out = []
    for k, v in request.headers.items():
        key = k.lower()
        if key in NOT_FORWARDED or key in named:
            continue
        if api_key and (key == "x-api-key" or (key == "authorization" and v[7:] == api_key and _bearer(v))):
            continue  # this server's own credential
        out.append((key, v))
    return out


def _bearer(value: str) -> bool:
    return value[:7].lower() == "bearer "


def upstream_url(upstream: str, request: Request) -> httpx.URL:
    """The upstream URL with the request's query string after its own."""
    url, query = httpx.URL(upstream), request.url.query.encode()
    if not query:
        return url
    return url.copy_with(query=url.query + b"&" + query if url.query else query)


def is_json(content_type: str) -> bool:
    """`application/json` or a `+json` type (`application/vnd.api+json`), parameters aside."""
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def json_tensor(body: bytes, service: Service, model: str | None) -> tuple[ModelRuntime, np.ndarray]:
    """The model and the (n, *shape) inputs of a JSON body the upstream would classify: a KServe v2 / Open
    Inference Protocol infer request (`{"inputs": [{"name", "shape", "datatype": "FP32", "data"}]}`, one input
    tensor) or a row-format request (`{"instances": [...]}`, KServe v1 and TF Serving: one nested list per
    input). The model: the `model` query parameter's, else the first served model whose input shape the
    tensor's rows have. Values must lie in the model's input range (as on /v2/.../infer). Anything else is
    refused, never forwarded unscored: a guard that waved through what it cannot read would be no guard."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise InputError("the body is declared JSON but does not parse", 422) from None
    if (
        isinstance(doc, dict)
        and isinstance(doc.get("inputs"), list)
        and all(isinstance(t, dict) for t in doc["inputs"])
    ):
        try:
            req = V2InferRequest.model_validate(doc)
        except ValidationError as e:
            first = e.errors()[0]
            raise InputError(f"KServe v2 request: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        if len(req.inputs) != 1:
            raise InputError(f"expected exactly one input tensor, got {len(req.inputs)}")
        dims = req.inputs[0].shape
        rt = _model_for(service, model, [list(dims[1:]), list(dims)])
        x = request_tensor(req, rt.detector.manifest.input.shape, None)
    elif isinstance(doc, dict) and "instances" in doc:
        try:
            x = np.asarray(doc["instances"], dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError("`instances` must be a list of equally shaped nested lists of numbers") from None
        if x.ndim < 2 or not len(x):
            raise InputError("`instances` must be a non-empty list of inputs, each a nested list of numbers")
        rt = _model_for(service, model, [list(x.shape[1:])])
        if list(x.shape[1:]) != rt.detector.manifest.input.shape:
            raise InputError(
                f"instances of shape {list(x.shape[1:])}; model {rt.name} takes {rt.detector.manifest.input.shape}"
            )
        if len(x) > MAX_V2_BATCH:
            raise InputError(f"at most {MAX_V2_BATCH} inputs per request", 413, "too_large")
        if not np.isfinite(x).all():
            raise InputError("input holds NaN or infinite values")
    else:
        raise InputError(
            "a JSON body is scored when it is a KServe v2 infer request (`inputs`: one FP32 tensor) or a row-format "
            "request (`instances`); this one is neither, so it is not forwarded",
            400,
        )
    m = rt.detector.manifest
    return rt, in_range(x, m.name, m.input.range)


def _model_for(service: Service, model: str | None, shapes: list[list[int]]) -> ModelRuntime:
    if model:
        return service.runtime(model)
    for rt in service.runtimes.values():
        if rt.detector.manifest.input.shape in shapes:
            return rt
    served = ", ".join(f"{rt.name} {rt.detector.manifest.input.shape}" for rt in service.runtimes.values())
    raise InputError(f"no served model takes inputs of shape {shapes[0]} (serving {served}); name one with ?model=")


async def detect_json(request: Request, service: Service, body: bytes) -> list[Detection]:
    """Each input's detection of a JSON body (json_tensor), all or none, as KServe v2 infer scores them."""
    start, due = time.monotonic(), deadline(request)
    rt, x = json_tensor(body, service, request.query_params.get("model"))
    request.scope["state"]["model"] = rt.name
    with rt.admit(len(x)) as held:
        settled = await settle(request, [rt.detect_part(part, held) for part in rt.parts(x)], due)
    if errors := [r for r in settled if isinstance(r, InputError)]:
        raise errors[0]
    d = service.settings.score_decimals
    dets = [detection(rt, v, t, start, d) for part in settled for v, t in part]
    request.scope["state"]["verdict"] = max(dets, key=lambda det: det.score).verdict
    return dets


# An upload as on /v1/detect, or JSON carrying a tensor (json_tensor).
GUARD_BODY = {
    "requestBody": {
        "content": {
            **UPLOAD_BODY["requestBody"]["content"],
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": 'a KServe v2 infer request ("inputs") or a row-format one ("instances")',
                }
            },
        }
    }
}


class _Replay:
    """Hands a body that was already read back to the upload parser."""

    def __init__(self, request: Request, body: bytes) -> None:
        self.headers, self.query_params, self._body = request.headers, request.query_params, body

    async def stream(self):
        yield self._body


@router.post(
    "/guard",
    responses={**ERRORS, 422: {"description": "adversarial; not forwarded"}, 502: {"description": "upstream failed"}},
    openapi_extra=GUARD_BODY,
)
async def guard(request: Request, service: ServiceDep) -> Response:
    """Score the upload (or the tensor of a JSON body); forward the request byte for byte to the upstream
    classifier unless blocked."""
    s = service.settings
    if not s.upstream or service.upstream is None:
        raise InputError("sidecar mode is off: start with --upstream URL", 404, "not_found")
    refuse_if_full(request, service)
    body = await read_body(request, s.max_upload_bytes, deadline(request))
    if is_json(request.headers.get("content-type", "")):
        dets = await detect_json(request, service, body)
        worst = max(dets, key=lambda d: d.score)
        verdict = "adversarial" if any(d.verdict == "adversarial" for d in dets) else "clean"
        tags = {"X-NCCR-Verdict": verdict, "X-NCCR-Score": f"{worst.score:g}", "X-NCCR-Model": worst.model}
        tags["X-NCCR-Inputs"] = str(len(dets))
        blocked = {"verdict": verdict, "model": worst.model, "results": [d.model_dump() for d in dets]}
    else:
        uploads, fields = await read_uploads(_Replay(request, body), s.max_upload_bytes, deadline(request))
        det = await detect_upload(request, service, uploads[0], fields.get("model"))
        tags = {"X-NCCR-Verdict": det.verdict, "X-NCCR-Score": f"{det.score:g}", "X-NCCR-Model": det.model}
        verdict, blocked = det.verdict, det.model_dump()
    if verdict == "adversarial" and s.on_adversarial == "block":
        return JSONResponse(blocked, 422, headers=tags)
    ours = {t.lower() for t in tags}  # a client's own X-NCCR-* headers are replaced, not passed on beside ours
    headers = [(k, v) for k, v in forwarded_headers(request, s.api_key) if k not in ours] + list(tags.items())
    start = time.monotonic()
    try:
        up = await service.upstream.post(upstream_url(s.upstream, request), content=body, headers=headers)
    except httpx.TimeoutException:
        return JSONResponse({"error": f"upstream timed out after {s.upstream_timeout_s}s"}, 504, headers=tags)
    except httpx.HTTPError as e:
        return JSONResponse({"error": f"upstream unreachable: {type(e).__name__}"}, 502, headers=tags)
    finally:
        service.metrics.upstream.observe(time.monotonic() - start)
    out_headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP}
    if up.status_code >= 500:
        return JSONResponse(
            {"error": f"upstream answered {up.status_code}", "upstream_body": up.text[:500]}, 502, headers=tags
        )
    return Response(up.content, up.status_code, headers={**out_headers, **tags})
