"""Read request bodies under a byte cap and a deadline (checked while reading, so a 1 GB body or a slowloris
upload is refused early), and find the uploaded file in a raw or multipart body."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from nccr_guard.inputs import InputError


@dataclass
class Upload:
    data: bytes
    filename: str | None
    content_type: str | None


async def _capped(request: Request, cap: int, deadline: float) -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise InputError(f"body of {declared} bytes exceeds the {cap}-byte limit", 413, "too_large")
    seen = 0
    stream = request.stream().__aiter__()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise InputError("upload too slow: body not received within the request timeout", 408, "timeout")
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), left)
        except StopAsyncIteration:
            return
        except ClientDisconnect:
            raise InputError("client disconnected during upload", 499, "client_gone") from None
        except TimeoutError:
            raise InputError("upload too slow: body not received within the request timeout", 408, "timeout") from None
        seen += len(chunk)
        if seen > cap:
            raise InputError(f"body exceeds the {cap}-byte limit", 413, "too_large")
        yield chunk


async def read_body(request: Request, cap: int, deadline: float) -> bytes:
    return b"".join([c async for c in _capped(request, cap, deadline)])


async def read_uploads(request: Request, cap: int, deadline: float) -> tuple[list[Upload], dict[str, str]]:
    """Every uploaded file (the `file` fields of a multipart body, or the raw body as one file) and the other
    text fields; query parameters count as fields too."""
    fields = dict(request.query_params)
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        if ctype.startswith(("application/json", "application/x-www-form-urlencoded", "text/")):
            raise InputError(
                f"content type {ctype.split(';')[0]} is not an upload: send multipart field `file` "
                "or a raw image/* or audio/* body",
                415,
            )
        body = b"".join([c async for c in _capped(request, cap, deadline)])
        if not body:
            raise InputError("empty body: send an image or audio file")
        return [Upload(body, None, ctype or None)], fields
    try:
        form = await MultiPartParser(
            request.headers, _capped(request, cap, deadline), max_files=64, max_fields=64
        ).parse()
    except MultiPartException as e:
        raise InputError(f"malformed multipart body: {e.message}") from None
    files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
    if not files:
        raise InputError("multipart body has no file field named `file`")
    out = [Upload(await f.read(), f.filename, f.content_type) for f in files]
    fields.update({k: v for k, v in form.multi_items() if isinstance(v, str)})
    await form.close()
    return out, fields
