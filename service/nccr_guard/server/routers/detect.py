"""POST /v1/detect and /v1/detect/batch: uploads in, verdicts out."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from nccr_guard.batcher import Reservation, Timings
from nccr_guard.detector import Verdict
from nccr_guard.inputs import InputError, declared_pixels, decode
from nccr_guard.server.deps import Authorized, ServiceDep, deadline
from nccr_guard.server.runtime import ModelRuntime
from nccr_guard.server.schemas import BatchDetection, BatchItem, Detection, Error, Prediction, TimingsMs
from nccr_guard.server.state import Service
from nccr_guard.server.uploads import Upload, read_uploads

T = TypeVar("T")

# Uploads whose headers declare at most this many pixels in all (one 256 px image, or up to INLINE_UPLOADS
# MNIST digits: ~0.1 ms a digit) are decoded on the event loop: a worker-thread hop costs the loop about as much
# as such a decode, and the decode holds the GIL either way. Single-digit throughput +13-20 %, 32-digit batch
# requests +27-31 % (docs/performance.md). Larger images and all audio go to a worker thread.
INLINE_PIXELS = 256 * 256
INLINE_UPLOADS = 32


def decode_inline(uploads: list[Upload]) -> bool:
    if len(uploads) > INLINE_UPLOADS:
        return False
    total = 0
    for up in uploads:
        if (px := declared_pixels(up.data)) is None:
            return False
        total += px
    return total <= INLINE_PIXELS


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


async def settle(request: Request, coros: list[Coroutine[Any, Any, T]], due: float) -> list[T | InputError]:
    """Run `coros` together until `due` (monotonic): each one's result or its InputError, and a 504 error for
    each still running at the deadline (cancelled, freeing its queue slot). One waiter watches for the client
    going away (then all are cancelled and 499 is raised), however many verdicts the request waits for."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    late: set[asyncio.Future] = set()
    try:
        pending = set(tasks)
        while pending:
            left = due - time.monotonic()
            if left <= 0:
                late = pending
                break
            _, pending = await asyncio.wait(pending, timeout=min(0.1, left))
            if pending and await request.is_disconnected():
                raise InputError("client disconnected", 499, "client_gone")
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
    out: list[T | InputError] = []
    for t in tasks:
        if t in late:
            out.append(InputError("request timed out waiting for its verdict", 504, "timeout"))
        elif (e := t.exception()) is None:
            out.append(t.result())
        elif isinstance(e, InputError):
            out.append(e)
        else:
            raise e
    return out


async def wait_unless_gone(request: Request, coro: Coroutine[Any, Any, T], due: float) -> T:
    """Await one coroutine under `settle`'s rules, raising its error."""
    [result] = await settle(request, [coro], due)
    if isinstance(result, InputError):
        raise result
    return result


def refuse_if_full(request: Request, service: Service) -> None:
    """Service.refuse_if_full for an upload request, from its query (`model`) and content type."""
    service.refuse_if_full(request.query_params.get("model"), request.headers.get("content-type", ""))


async def detect_uploads(
    request: Request, service: Service, uploads: list[Upload], model: str | None
) -> list[Detection | InputError]:
    """Verdicts for every upload of a request, or each one's error. The uploads are decoded together (on the
    event loop when small, see INLINE_PIXELS, else in one worker-thread call) and their verdicts awaited
    together: one thread hop and one waiter per image cost more than an MNIST verdict (profiled on
    /v1/detect/batch). Decoding counts against the deadline too. Inputs beyond the free places in their model's
    queue are refused (503 each) before anything is decoded: decoding them only to be refused at the queue cost
    the overloaded event loop a PNG decode each."""
    start = time.monotonic()
    routed: list[ModelRuntime | InputError] = []
    for up in uploads:
        try:
            routed.append(service.runtime(model, up.data))
        except InputError as e:
            routed.append(e)
    # Each model's free places are held for this request's inputs until their parts are submitted (see
    # ModelRuntime.admit); the inputs beyond them are refused here.
    held: dict[ModelRuntime, Reservation] = {}
    try:
        wanted = Counter(rt for rt in routed if isinstance(rt, ModelRuntime))
        for rt, n in wanted.items():  # free() asked once per model: it may purge the queue
            held[rt] = rt.batcher.reserve(min(n, max(rt.batcher.free(), 0)))
        room = {rt: r.left for rt, r in held.items()}
        for i, rt in enumerate(routed):
            if isinstance(rt, ModelRuntime):
                room[rt] -= 1
                if room[rt] < 0:
                    routed[i] = rt.at_capacity()
        return await _detect_routed(request, service, uploads, routed, held, start)
    finally:
        for r in held.values():
            r.release()


def detection(rt: ModelRuntime, v: Verdict, t: Timings, start: float, d: int) -> Detection:
    """The answer for one verdict of model `rt`, scores rounded to `d` decimals; `start`: when the request's
    work began (monotonic), for `timings_ms.total`."""
    return Detection(
        model=rt.name,
        modality=rt.detector.manifest.modality,
        verdict=v.verdict,
        score=round(v.score, d),
        threshold=round(v.threshold, d),
        p_value=round(v.p_value, d),
        ood=v.ood,
        prediction=Prediction(index=v.index, label=v.label, confidence=round(v.confidence, d)),
        passes=v.passes,
        timings_ms=TimingsMs(
            queue=round(t.queue_s * 1e3, 3),
            compute=round(t.compute_s * 1e3, 3),
            total=round((time.monotonic() - start) * 1e3, 3),
        ),
    )


async def _detect_routed(
    request: Request,
    service: Service,
    uploads: list[Upload],
    routed: list[ModelRuntime | InputError],
    held: dict[ModelRuntime, Reservation],
    start: float,
) -> list[Detection | InputError]:
    """detect_uploads once its uploads are routed and their queue places held."""

    def prepare() -> list[tuple[ModelRuntime, np.ndarray] | InputError]:
        out: list[tuple[ModelRuntime, np.ndarray] | InputError] = []
        for up, rt in zip(uploads, routed, strict=True):
            if isinstance(rt, InputError):
                out.append(rt)
                continue
            try:
                out.append((rt, decode(up.data, rt.detector.manifest, service.limits)))
            except InputError as e:
                out.append(e)
        return out

    async def part(rt: ModelRuntime, xs: np.ndarray) -> list[Detection]:
        d = service.settings.score_decimals
        return [detection(rt, v, t, start, d) for v, t in await rt.detect_part(xs, held[rt])]

    due = deadline(request)
    state = request.scope["state"]
    up = uploads[-1]
    state["upload"] = {
        "bytes": len(up.data),
        "type": up.content_type,
        "sha256": hashlib.sha256(up.data).hexdigest()[:16],
    }
    if decode_inline(uploads):
        prepared = prepare()
    else:
        prepared = await wait_unless_gone(request, run_in_threadpool(prepare), due)
    runs = [p for p in prepared if not isinstance(p, InputError)]
    if runs:
        state["model"] = runs[-1][0].name
    # Each model's inputs go in parts of one forward's worth (ModelRuntime.parts); a part's error is each of its
    # inputs' error.
    by_model: dict[ModelRuntime, list[int]] = {}
    for i, (rt, _) in enumerate(runs):
        by_model.setdefault(rt, []).append(i)
    coros, owners = [], []
    for rt, idx in by_model.items():
        xs = runs[idx[0]][1][None] if len(idx) == 1 else np.stack([runs[i][1] for i in idx])  # stack: ~10 µs
        coros += [part(rt, part_xs) for part_xs in rt.parts(xs)]
        owners += rt.parts(idx)
    found: dict[int, Detection | InputError] = {}
    for idx, got in zip(owners, await settle(request, coros, due), strict=True):
        for j, i in enumerate(idx):
            found[i] = got if isinstance(got, InputError) else got[j]
    it = (found[i] for i in range(len(runs)))
    results = [p if isinstance(p, InputError) else next(it) for p in prepared]
    if verdicts := [r.verdict for r in results if isinstance(r, Detection)]:
        state["verdict"] = verdicts[-1]
    return results


async def detect_upload(request: Request, service: Service, up: Upload, model: str | None) -> Detection:
    """One upload's verdict, raising its error."""
    [result] = await detect_uploads(request, service, [up], model)
    if isinstance(result, InputError):
        raise result
    return result


async def score_one(request: Request, service: Service) -> Detection:
    """POST /v1/detect once its API key is checked, for the FastAPI route and DirectRoutes alike."""
    refuse_if_full(request, service)
    uploads, fields = await read_uploads(request, service.settings.max_upload_bytes, deadline(request))
    if len(uploads) != 1:
        raise InputError(f"send exactly one file here ({len(uploads)} given); use /v1/detect/batch for several")
    return await detect_upload(request, service, uploads[0], fields.get("model"))


@router.post("/detect", response_model=Detection, responses=ERRORS, openapi_extra=UPLOAD_BODY)
async def detect(request: Request, service: ServiceDep) -> Detection:
    """Score one image or audio clip: multipart field `file`, or a raw `image/*` / `audio/*` body."""
    return await score_one(request, service)


async def score_batch(request: Request, service: Service) -> BatchDetection:
    """POST /v1/detect/batch once its API key is checked, for the FastAPI route and DirectRoutes alike."""
    refuse_if_full(request, service)
    uploads, fields = await read_uploads(request, service.settings.max_upload_bytes, deadline(request))
    results = await detect_uploads(request, service, uploads, fields.get("model"))
    # A failed item is a rejection too, though the answer is 200 (a whole request's error counts in the handler).
    for r in results:
        if isinstance(r, InputError):
            service.metrics.rejections.labels(r.reason).inc()
    return BatchDetection(
        results=[
            BatchItem(filename=up.filename, error=str(r), status=r.status)
            if isinstance(r, InputError)
            else BatchItem(filename=up.filename, result=r)
            for up, r in zip(uploads, results, strict=True)
        ]
    )


@router.post("/detect/batch", response_model=BatchDetection, responses=ERRORS, openapi_extra=UPLOAD_BODY)
async def detect_batch(request: Request, service: ServiceDep) -> BatchDetection:
    """Score several files (repeated multipart field `file`); each gets its own result or error."""
    return await score_batch(request, service)
