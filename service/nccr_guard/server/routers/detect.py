"""POST /v1/detect and /v1/detect/batch: uploads in, verdicts out."""

from __future__ import annotations

import asyncio
import hashlib
import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from nccr_guard.inputs import InputError, decode
from nccr_guard.server.deps import Authorized, ServiceDep, deadline
from nccr_guard.server.schemas import BatchDetection, BatchItem, Detection, Error, Prediction, TimingsMs
from nccr_guard.server.state import Service
from nccr_guard.server.uploads import Upload, read_uploads

router = APIRouter(prefix="/v1", tags=["detect"], dependencies=[Authorized])

ERRORS = {code: {"model": Error} for code in (400, 401, 404, 408, 413, 415, 503, 504)}
UPLOAD_BODY = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}, "model": {"type": "string"}},
                    "required": ["file"],
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "audio/wav": {"schema": {"type": "string", "format": "binary"}},
        }
    }
}


async def wait_unless_gone(request: Request, coro, due: float):
    """Await `coro` until `due` (monotonic); cancel it (freeing its queue slot) if the client disconnects."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            left = due - time.monotonic()
            if left <= 0:
                raise InputError("request timed out waiting for its verdict", 504, "timeout")
            done, _ = await asyncio.wait({task}, timeout=min(0.1, left))
            if done:
                return task.result()
            if await request.is_disconnected():
                raise InputError("client disconnected", 499, "client_gone")
    finally:
        if not task.done():
            task.cancel()


async def detect_upload(request: Request, service: Service, up: Upload, model: str | None) -> Detection:
    start = time.monotonic()
    rt = service.runtime(model, up.data)
    request.scope["state"]["model"] = rt.name
    request.scope["state"]["upload"] = {
        "bytes": len(up.data),
        "type": up.content_type,
        "sha256": hashlib.sha256(up.data).hexdigest()[:16],
    }

    async def verdict():  # decoding counts against the deadline too: a slow decode must not outlive it
        x = await run_in_threadpool(decode, up.data, rt.detector.manifest, service.limits)
        return await rt.detect(x)

    v, t = await wait_unless_gone(request, verdict(), deadline(request))
    request.scope["state"]["verdict"] = v.verdict
    d = service.settings.score_decimals
    return Detection(
        model=rt.name,
        modality=rt.detector.manifest.modality,
        verdict=v.verdict,
        score=round(v.score, d),
        threshold=round(v.threshold, d),
        p_value=round(v.p_value, d),
        prediction=Prediction(index=v.index, label=v.label, confidence=round(v.confidence, d)),
        passes=v.passes,
        timings_ms=TimingsMs(
            queue=round(t.queue_s * 1e3, 3),
            compute=round(t.compute_s * 1e3, 3),
            total=round((time.monotonic() - start) * 1e3, 3),
        ),
    )


@router.post("/detect", response_model=Detection, responses=ERRORS, openapi_extra=UPLOAD_BODY)
async def detect(request: Request, service: ServiceDep) -> Detection:
    """Score one image or audio clip: multipart field `file`, or a raw `image/*` / `audio/*` body."""
    uploads, fields = await read_uploads(request, service.settings.max_upload_bytes, deadline(request))
    if len(uploads) != 1:
        raise InputError(f"send exactly one file here ({len(uploads)} given); use /v1/detect/batch for several")
    return await detect_upload(request, service, uploads[0], fields.get("model"))


@router.post("/detect/batch", response_model=BatchDetection, responses=ERRORS, openapi_extra=UPLOAD_BODY)
async def detect_batch(request: Request, service: ServiceDep) -> BatchDetection:
    """Score several files (repeated multipart field `file`); each gets its own result or error."""
    uploads, fields = await read_uploads(request, service.settings.max_upload_bytes, deadline(request))

    async def one(up: Upload) -> BatchItem:
        try:
            return BatchItem(
                filename=up.filename, result=await detect_upload(request, service, up, fields.get("model"))
            )
        except InputError as e:
            return BatchItem(filename=up.filename, error=str(e), status=e.status)

    return BatchDetection(results=list(await asyncio.gather(*(one(u) for u in uploads))))
