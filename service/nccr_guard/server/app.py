"""The app factory. Settings come in as an argument (never built at import); models load in the lifespan,
and readiness stays false until each has run its warm-up batches."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from nccr_guard import __version__
from nccr_guard.config import Settings
from nccr_guard.detector import Detector
from nccr_guard.engine.variants import unknown_schedule_names
from nccr_guard.inputs import InputError
from nccr_guard.manifest import load_manifest
from nccr_guard.server.deps import OpenOrAuthorized
from nccr_guard.server.direct import DirectRoutes, route_of
from nccr_guard.server.errors import input_error_response, unexpected_response
from nccr_guard.server.metrics import GcPauses, Metrics, watch_event_loop
from nccr_guard.server.middleware import ServiceMiddleware
from nccr_guard.server.pages import add_pages
from nccr_guard.server.routers import detect, explain, guard, models, v2
from nccr_guard.server.runtime import ModelRuntime, batch_policy
from nccr_guard.server.state import Service
from nccr_guard.server.workers import StartGate

log = logging.getLogger("nccr_guard")


def load_runtime(settings: Settings, folder, metrics: Metrics) -> ModelRuntime:
    # Intra-op threads per batch worker come from the CPU policy, so they must be known before the backend is built.
    cpu_threads = batch_policy(settings, "cpu", 1).torch_threads
    det = Detector.load(
        folder,
        backend=settings.backend,
        device=settings.device,
        k=settings.k,
        seed=settings.seed,
        half=settings.half,
        cuda_graphs=settings.cuda_graphs,
        sequential=settings.sequential,
        schedule=settings.sequential_schedule,
        truncate=settings.truncate,
        fuse=settings.fuse,
        threads=cpu_threads if settings.device != "cuda" else 0,
    )
    policy = batch_policy(settings, det.backend.device, det.rows_per_input)
    return ModelRuntime(det, policy, metrics, settings.max_queue)


def served_names(folders: list) -> list[str]:
    """Each folder's model name, refused where two folders give the same one: a URL names one model."""
    names: dict[str, object] = {}
    for folder in folders:
        name = load_manifest(folder).name
        if name in names:
            raise RuntimeError(
                f"two models named {name!r}: {names[name]} and {folder}; give one another name in its model.toml"
            )
        names[name] = folder
    return list(names)


def create_app(settings: Settings, gate: StartGate | None = None) -> FastAPI:
    """`gate`: this app is one of several worker processes, ready only once all have started."""
    service = Service(settings=settings, metrics=Metrics(), gate=gate)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        folders = settings.served_models
        if not folders:
            raise RuntimeError("no models to serve: pass --models DIR or --add-model DIR (a folder with model.toml)")
        served = served_names(folders)
        schedule = settings.sequential_schedule
        if schedule and (unknown := unknown_schedule_names(schedule, served)):
            raise RuntimeError(
                f"--sequential-schedule names {', '.join(unknown)}, not served here (models: {', '.join(served)})"
            )
        for folder in folders:
            rt = await run_in_threadpool(load_runtime, settings, folder, service.metrics)
            service.runtimes[rt.name] = rt
            d = rt.detector
            service.metrics.model_info.labels(
                rt.name,
                d.manifest.modality,
                d.backend.name,
                d.backend.device,
                d.variant.name,
                str(max(p.copies for p in d.variant.perturbations)),
            ).set(1)
            log.info(
                "serving %s (%s) on %s/%s, variant %s, %d passes, batching %s",
                rt.name,
                d.manifest.modality,
                d.backend.name,
                d.backend.device,
                d.variant.name,
                d.rows_per_input,
                rt.policy,
            )
        if settings.upstream:
            service.upstream = httpx.AsyncClient(timeout=settings.upstream_timeout_s)
        for rt in service.runtimes.values():
            await rt.start()
        service.sample_gauges()
        lag_watch = asyncio.create_task(
            watch_event_loop(service.metrics.loop_lag, service.sample_gauges), name="event-loop-lag"
        )
        # Everything alive now (torch, ONNX Runtime, the app: ~250k objects) lives as long as the process: moved
        # out of the collector's sight, a full collection no longer stops the event loop and the batch workers
        # for 50-250 ms under load (nccr_guard_gc_pause_seconds; docs/performance.md).
        if settings.gc_freeze:
            gc.collect()
            gc.freeze()
        service.gc_pauses = GcPauses(service.metrics.gc_pause)  # flushed into the metric by sample_gauges
        with service.gc_pauses:
            yield
        lag_watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lag_watch
        service.draining = True
        service.metrics.ready.set(0)
        for rt in service.runtimes.values():
            await rt.batcher.drain(settings.drain_s)
            await rt.batcher.stop()
        if service.upstream:
            await service.upstream.aclose()

    app = FastAPI(
        title="nccr-guard",
        version=__version__,
        lifespan=lifespan,
        description="Detects adversarial images and audio by neuron cover change rate (NCCR).",
        docs_url=None,  # /docs and /redoc come from pages.add_pages, with their assets served from the package
        redoc_url=None,
    )
    app.state.service = service
    if settings.direct_routes:  # added first: inside ServiceMiddleware, which must see every request
        direct = [
            (route_of(detect.router.routes, "/v1/detect"), detect.score_one),
            (route_of(detect.router.routes, "/v1/detect/batch"), detect.score_batch),
            (route_of(v2.router.routes, "/v2/models/{name}/infer"), v2.infer_direct),
            (route_of(v2.router.routes, "/v2/models/{name}/versions/{version}/infer"), v2.infer_direct),
        ]
        app.add_middleware(DirectRoutes, service=service, handlers=direct)
    app.add_middleware(ServiceMiddleware, service=service)
    routers = (detect.router, explain.router, models.router, v2.router, guard.router)
    for r in routers:
        app.include_router(r)
    add_pages(app, service, routers)
    _add_error_handlers(app, service)

    @app.get(
        "/metrics",
        tags=["ops"],
        dependencies=[OpenOrAuthorized],
        response_class=PlainTextResponse,
        responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        """Prometheus text exposition format."""
        service.sample_gauges()
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def _add_error_handlers(app: FastAPI, service: Service) -> None:
    @app.exception_handler(InputError)
    async def input_error(request: Request, e: InputError) -> JSONResponse:
        return input_error_response(service, request, e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        service.metrics.rejections.labels("bad_input").inc()
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"invalid request: {where}: {first.get('msg', 'bad value')}"}, 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        return unexpected_response(request)
