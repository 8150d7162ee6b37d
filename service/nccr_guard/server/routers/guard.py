"""Sidecar mode: POST /v1/guard scores the upload, then forwards the unchanged request to the upstream
classifier (clean, or any verdict with on_adversarial=tag) and returns its answer with X-NCCR-* headers.

Forwarded: the body byte for byte, the query string (after the upstream URL's own), and every request header
but the hop-by-hop ones (RFC 9110 7.6.1, those the Connection header names included), Host and Content-Length
(httpx sets both for the upstream), and the credential this server checked itself (X-API-Key, or an
`Authorization: Bearer` carrying this server's key), which is never the upstream's to see. So `Authorization`,
cookies and custom headers reach the upstream as the client sent them."""

from __future__ import annotations

import time

import httpx
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from nccr_guard.inputs import InputError
from nccr_guard.server.deps import Authorized, ServiceDep, deadline
from nccr_guard.server.routers.detect import ERRORS, UPLOAD_BODY, detect_upload, refuse_if_full
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


class _Replay:
    """Hands a body that was already read back to the upload parser."""

    def __init__(self, request: Request, body: bytes) -> None:
        self.headers, self.query_params, self._body = request.headers, request.query_params, body

    async def stream(self):
        yield self._body


@router.post(
    "/guard",
    responses={**ERRORS, 422: {"description": "adversarial; not forwarded"}, 502: {"description": "upstream failed"}},
    openapi_extra=UPLOAD_BODY,
)
async def guard(request: Request, service: ServiceDep) -> Response:
    """Score the upload; forward the request byte for byte to the upstream classifier unless blocked."""
    s = service.settings
    if not s.upstream or service.upstream is None:
        raise InputError("sidecar mode is off: start with --upstream URL", 404, "not_found")
    refuse_if_full(request, service)
    body = await read_body(request, s.max_upload_bytes, deadline(request))
    uploads, fields = await read_uploads(_Replay(request, body), s.max_upload_bytes, deadline(request))
    det = await detect_upload(request, service, uploads[0], fields.get("model"))
    tags = {"X-NCCR-Verdict": det.verdict, "X-NCCR-Score": f"{det.score:g}", "X-NCCR-Model": det.model}
    if det.verdict == "adversarial" and s.on_adversarial == "block":
        return JSONResponse(det.model_dump(), 422, headers=tags)
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
