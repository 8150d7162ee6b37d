"""Open Inference Protocol (KServe v2) REST: health, model metadata and FP32 tensor inference, with the binary
tensor data extension: a body of `Inference-Header-Content-Length` bytes of JSON followed by the raw tensor
(little-endian FP32, row-major; the input says `"parameters": {"binary_data_size": N}`), as Triton and KServe
clients send it. Raw tensors skip both image decoding and JSON number parsing; outputs are always JSON (a request
may name the outputs it wants)."""

from __future__ import annotations

import json
import math

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from nccr_guard import __version__
from nccr_guard.inputs import InputError
from nccr_guard.server.deps import Authorized, OpenOrAuthorized, ServiceDep, check_key, deadline, get_service
from nccr_guard.server.direct import Delegate
from nccr_guard.server.routers.detect import settle
from nccr_guard.server.schemas import Error, V2InferRequest, V2InferResponse, V2Tensor
from nccr_guard.server.state import Service
from nccr_guard.server.uploads import read_body

MAX_V2_BATCH = 64
BINARY_HEADER = "inference-header-content-length"
OUTPUTS = {"score": "FP32", "verdict": "BYTES", "prediction": "INT64"}  # name: datatype, the default order


class _JsonPart(Request):
    """A request whose body is only the JSON header of a binary-extension body."""

    def __init__(self, scope, receive, json_part: bytes) -> None:
        super().__init__(scope, receive)
        self._body = json_part


class BinaryTensorRoute(APIRoute):
    """Splits a binary-extension body before FastAPI parses it: the JSON header goes on as the request body (so
    validation and the OpenAPI schema stay FastAPI's), the tensor bytes into the request state. FastAPI's
    documented way to change a body before parsing (a custom APIRoute, as for gzip bodies)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            service = await get_service(request)
            if request.method == "POST" and (name := request.path_params.get("name")):  # infer
                check_key(request, service)  # the key first, as everywhere
                _check_version(service, name, request.path_params.get("version"))
                service.refuse_if_full(name, "")  # before the body is read (Service.refuse_if_full)
                if (declared := request.headers.get(BINARY_HEADER)) is None:
                    # A JSON body whatever its declared type (none, application/octet-stream, ...), as Triton
                    # reads it: tritonclient's JSON mode sends no Content-Type at all.
                    return await handler(_as_json(request))
                json_part, binary = await split_binary(request, service, declared)
                request = _as_json(request, json_part)
                request.scope["state"]["v2_binary"] = binary
            return await handler(request)

        return route


def _as_json(request: Request, json_part: bytes | None = None) -> Request:
    """The request with `Content-Type: application/json` (FastAPI parses only a body declared JSON, or one
    declaring nothing); with `json_part`, that as its whole body."""
    scope = dict(request.scope)
    drop = (b"content-type", b"content-length") if json_part is not None else (b"content-type",)
    scope["headers"] = [*((k, v) for k, v in scope["headers"] if k not in drop), (b"content-type", b"application/json")]
    return Request(scope, request.receive) if json_part is None else _JsonPart(scope, request.receive, json_part)


async def split_binary(request: Request, service: Service, declared: str) -> tuple[bytes, bytes]:
    """A binary-extension body read and cut after its `declared` JSON length: (JSON header, tensor bytes)."""
    body = await read_body(request, service.settings.max_upload_bytes, deadline(request))
    if not declared.isdigit() or int(declared) > len(body):
        raise InputError(f"{BINARY_HEADER} {declared!r} is not a length within the {len(body)}-byte body")
    return body[: int(declared)], body[int(declared) :]


router = APIRouter(prefix="/v2", tags=["kserve-v2"], route_class=BinaryTensorRoute)


@router.get("", dependencies=[OpenOrAuthorized])
async def server_metadata() -> dict:
    return {"name": "nccr-guard", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", dependencies=[OpenOrAuthorized], responses={503: {"model": Error}})
async def ready(service: ServiceDep):
    if service.ready:
        return {"ready": True}
    return JSONResponse({"ready": False, "error": "not ready"}, 503)


def _runtime(service, name: str):
    if name not in service.runtimes:
        raise InputError(f"no model named {name!r}", 404, "not_found")
    return service.runtimes[name]


def _check_version(service: Service, name: str, version: str | None) -> None:
    """A version-specific call names the one version a model advertises (its manifest's); any other is 404."""
    if version is not None and version != (v := _runtime(service, name).detector.manifest.version):
        raise InputError(f"model {name!r} has no version {version!r}; its version is {v!r}", 404, "not_found")


@router.get("/models/{name}", dependencies=[Authorized], responses={404: {"model": Error}})
async def model_metadata(name: str, service: ServiceDep) -> dict:
    rt = _runtime(service, name)
    m = rt.detector.manifest
    return {
        "name": m.name,
        "versions": [m.version],
        "platform": f"nccr-guard/{rt.detector.backend.name}",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *m.input.shape]}],
        "outputs": [{"name": o, "datatype": t, "shape": [-1]} for o, t in OUTPUTS.items()],
    }


@router.get("/models/{name}/ready", dependencies=[Authorized], responses={404: {"model": Error}})
async def model_ready(name: str, service: ServiceDep):
    rt = _runtime(service, name)
    return JSONResponse({"name": name, "ready": rt.ready}, 200 if rt.ready and not service.draining else 503)


@router.get("/models/{name}/versions/{version}", dependencies=[Authorized], responses={404: {"model": Error}})
async def model_version_metadata(name: str, version: str, service: ServiceDep) -> dict:
    """The metadata of the model's one version (the one /v2/models/{name} lists); another version is 404."""
    _check_version(service, name, version)
    return await model_metadata(name, service)


@router.get("/models/{name}/versions/{version}/ready", dependencies=[Authorized], responses={404: {"model": Error}})
async def model_version_ready(name: str, version: str, service: ServiceDep):
    _check_version(service, name, version)
    return await model_ready(name, service)


def request_tensor(req: V2InferRequest, shape: list[int], binary: bytes | None) -> np.ndarray:
    if len(req.inputs) != 1:
        raise InputError(f"expected exactly one input tensor, got {len(req.inputs)}")
    t = req.inputs[0]
    if t.datatype != "FP32":
        raise InputError(f"input datatype must be FP32, got {t.datatype}")
    dims = t.shape if len(t.shape) == len(shape) + 1 else [1, *t.shape]
    if list(dims[1:]) != list(shape) or dims[0] < 1 or any(d < 0 for d in dims):
        raise InputError(f"input shape {t.shape} does not match [-1, {', '.join(map(str, shape))}]")
    if dims[0] > MAX_V2_BATCH:
        raise InputError(f"at most {MAX_V2_BATCH} inputs per request", 413, "too_large")
    size = (t.parameters or {}).get("binary_data_size")
    if size is None and binary is not None:
        raise InputError(f"{len(binary)} bytes of binary data, but no input declares binary_data_size")
    if size is not None:
        if binary is None:
            raise InputError(f"binary_data_size needs the {BINARY_HEADER} header and the tensor after the JSON")
        if t.data:
            raise InputError("an input has either data or binary_data_size, not both")
        if not isinstance(size, int) or size != len(binary) or size != 4 * math.prod(dims):
            raise InputError(
                f"binary_data_size {size!r}: the body holds {len(binary)} bytes after the JSON, "
                f"shape {t.shape} in FP32 needs {4 * math.prod(dims)}"
            )
        x = np.frombuffer(binary, "<f4").reshape(dims)
    else:
        data = t.data or []
        if len(data) != math.prod(dims):
            raise InputError(f"data holds {len(data)} values, shape {t.shape} needs {math.prod(dims)}")
        try:
            x = np.asarray(data, dtype=np.float32).reshape(dims)
        except (TypeError, ValueError):
            raise InputError("data must be a flat list of numbers") from None
    if not np.isfinite(x).all():
        raise InputError("input holds NaN or infinite values")
    return x


RANGE_TOLERANCE = 0.01  # of the declared range's width: rounding in a client's scaling is no mismatch


def in_range(x: np.ndarray, model: str, declared: tuple[float, float]) -> np.ndarray:
    """`x` clipped to the model's declared input range (manifest [input].range), refused (400) where a value lies
    beyond it by more than RANGE_TOLERANCE of its width: a tensor of 0-255 pixels sent to a 0-1 model would
    otherwise be clipped to a white square and answered with a verdict on it."""
    lo, hi = declared
    slack = RANGE_TOLERANCE * (hi - lo)
    got_lo, got_hi = float(x.min()), float(x.max())
    if got_lo < lo - slack or got_hi > hi + slack:
        hint = " (0-255 pixels? divide them by 255)" if got_hi > 1.5 and hi <= 1 else ""
        raise InputError(
            f"input values span [{got_lo:g}, {got_hi:g}], outside the input range [{lo:g}, {hi:g}] of model "
            f"{model!r} (its model.toml [input] range){hint}"
        )
    return np.clip(x, lo, hi)


_INFER_ERRORS = {400: {"model": Error}, 404: {"model": Error}, 503: {"model": Error}}


@router.post("/models/{name}/infer", dependencies=[Authorized], response_model=V2InferResponse, responses=_INFER_ERRORS)
async def infer(name: str, req: V2InferRequest, request: Request, service: ServiceDep) -> V2InferResponse:
    """FP32 tensors in, `score`, `verdict`, `prediction` out. The body is JSON whatever its Content-Type, or
    (binary tensor data extension) JSON of `Inference-Header-Content-Length` bytes followed by the tensors."""
    return await run_infer(request, service, name, req, request.scope["state"].get("v2_binary"))


@router.post(
    "/models/{name}/versions/{version}/infer",
    dependencies=[Authorized],
    response_model=V2InferResponse,
    responses=_INFER_ERRORS,
)
async def infer_version(
    name: str, version: str, req: V2InferRequest, request: Request, service: ServiceDep
) -> V2InferResponse:
    """As /v2/models/{name}/infer, for the model's one version (checked before the body is read)."""
    return await run_infer(request, service, name, req, request.scope["state"].get("v2_binary"))


async def infer_direct(request: Request, service: Service) -> V2InferResponse:
    """KServe v2 infer with binary tensors for DirectRoutes (server/direct.py), its key checked: the FastAPI
    route's work, with the JSON header validated here. Requests without binary tensors (values in JSON, rare and
    slow anyway) and headers that fail validation go to the FastAPI route, which answers them as always."""
    if (declared := request.headers.get(BINARY_HEADER)) is None:
        raise Delegate()  # before the queue check: the route makes it
    name = request.path_params["name"]
    _check_version(service, name, request.path_params.get("version"))
    service.refuse_if_full(name, "")  # before the body is read, as on the route
    json_part, binary = await split_binary(request, service, declared)
    try:
        req = V2InferRequest.model_validate(json.loads(json_part))  # as FastAPI parses a JSON body
    except ValueError:  # not JSON (JSONDecodeError), or not a valid request (ValidationError)
        raise Delegate(json_part + binary) from None
    return await run_infer(request, service, name, req, binary)


async def run_infer(
    request: Request, service: Service, name: str, req: V2InferRequest, binary: bytes | None
) -> V2InferResponse:
    """Verdicts of a validated infer request (`binary`: its tensor bytes, if sent so), all or none."""
    rt = _runtime(service, name)
    request.scope["state"]["model"] = name
    m = rt.detector.manifest
    wanted = _requested_outputs(req)
    x = in_range(request_tensor(req, m.input.shape, binary), m.name, m.input.range)
    due = deadline(request)
    with rt.admit(len(x)) as held:
        settled = await settle(request, [rt.detect_part(part, held) for part in rt.parts(x)], due)
    if errors := [r for r in settled if isinstance(r, InputError)]:
        raise errors[0]
    results = [v for part in settled for v, _ in part]
    n, d = len(results), service.settings.score_decimals
    values = {
        "score": lambda: [round(v.score, d) for v in results],
        "verdict": lambda: [v.verdict for v in results],
        "prediction": lambda: [v.index for v in results],
    }
    return V2InferResponse(
        model_name=name,
        model_version=m.version,
        id=req.id,
        outputs=[V2Tensor(name=o, shape=[n], datatype=OUTPUTS[o], data=values[o]()) for o in wanted],
    )


def _requested_outputs(req: V2InferRequest) -> list[str]:
    """The outputs to answer, in the order asked for: all of them when the request names none, as the protocol
    says; an unknown name is the client's error (400) before any work is queued. Values come back as JSON
    whatever an output's `binary_data` parameter asks."""
    if not req.outputs:
        return list(OUTPUTS)
    names = [o.get("name") for o in req.outputs]
    if unknown := [n for n in names if n not in OUTPUTS]:
        raise InputError(f"unknown output {unknown[0]!r}: this model's outputs are {', '.join(OUTPUTS)}")
    return list(dict.fromkeys(names))
