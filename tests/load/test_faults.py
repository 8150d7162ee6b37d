"""Overload, disconnects, backend faults, huge and slow bodies, against real servers on 127.0.0.1.

Bounded: the overload run offers 3x the measured capacity of the speaker model for 30 s (a few hundred requests),
every other test sends a handful of requests.
"""

from __future__ import annotations

import asyncio
import re
import socket
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from nccr_guard.audio import encode_wav
from tests.conftest import MNIST, ROOT, request_parts, start_server
from tests.faulty import faulty_folder, marked
from tests.load.test_load import metric

SPEAKER = ROOT / "models" / "speaker"


def clip() -> bytes:
    t = np.arange(32000) / 16000
    return encode_wav(
        (0.2 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32), 16000
    )


async def closed_loop(url: str, body: bytes, seconds: float, concurrency: int) -> list[float]:
    """Latencies of back-to-back requests from `concurrency` clients for `seconds`."""
    out: list[float] = []
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:

        async def worker():
            while time.monotonic() < stop:
                t = time.monotonic()
                r = await c.post("/v1/detect", content=body, headers={"content-type": "audio/wav"})
                assert r.status_code == 200, r.text
                out.append(time.monotonic() - t)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


@dataclass
class Sent:
    """One open-loop request: its answer (or the client error), its client-side seconds, and where they went."""

    answer: httpx.Response | Exception
    seconds: float
    start: float  # seconds after the run began
    connect_s: float = 0.0  # opening a new TCP connection (0 on a reused one)
    wait_s: float = 0.0  # request headers sent -> response headers received: the server's share

    @property
    def app_s(self) -> float:
        """The server's own time for the request (its Server-Timing header), 0 without an answer."""
        timing = getattr(self.answer, "headers", {}).get("server-timing", "app;dur=0")
        return float(timing.split("dur=")[1]) / 1e3

    @property
    def code(self) -> int | str:
        return getattr(self.answer, "status_code", type(self.answer).__name__)


async def open_loop(url: str, body: bytes, rate: float, seconds: float) -> tuple[list[Sent], float]:
    """Requests launched on a fixed schedule regardless of answers (an open-loop load generator); also how late,
    at worst, this client's own event loop ran (its share of the time outside the server)."""
    n = int(rate * seconds)
    worst_lag = 0.0

    async def watch_own_loop() -> None:
        nonlocal worst_lag
        while True:
            due = time.monotonic() + 0.05
            await asyncio.sleep(0.05)
            worst_lag = max(worst_lag, time.monotonic() - due)

    # One connection per request: with keep-alive, httpx's pool held some requests 30-40 s before sending them
    # under this load (measured with the trace marks below: the client, not the server) and raced the server's
    # keep-alive close (ReadError).
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        t0 = time.monotonic()

        async def one(i: int) -> Sent:
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            start, marks = time.monotonic(), {}

            async def trace(event: str, _info: dict) -> None:
                marks[event] = time.monotonic()

            try:
                r = await c.post(
                    "/v1/detect", content=body, headers={"content-type": "audio/wav"}, extensions={"trace": trace}
                )
            except httpx.HTTPError as e:
                r = e
            sent = Sent(r, time.monotonic() - start, start - t0)
            span = {"connect_s": "connection.connect_tcp", "wait_s": "http11.send_request_headers"}
            for name, first in span.items():
                last = first.replace("send_request", "receive_response") + ".complete"
                if last in marks:
                    setattr(sent, name, marks[last] - marks[first + ".started"])
            return sent

        watch = asyncio.create_task(watch_own_loop())
        results = await asyncio.gather(*(one(i) for i in range(n)))
        watch.cancel()
        return results, worst_lag


def test_three_times_capacity_for_30_s_sheds_cleanly_and_recovers(tmp_path):
    s = start_server(tmp_path, "--models", str(SPEAKER), "--max-queue", "16", "--request-timeout-s", "5")
    body = clip()
    try:
        asyncio.run(closed_loop(s.url, body, 2, 2))  # warm
        lat = asyncio.run(closed_loop(s.url, body, 5, 4))
        capacity = len(lat) / 5
        base = statistics.median(asyncio.run(closed_loop(s.url, body, 3, 1)))
        results, client_lag = asyncio.run(open_loop(s.url, body, 3 * capacity, 30))
        counts = Counter(r.code for r in results)
        slowest = sorted(results, key=lambda r: -r.seconds)[:5]
        text = s.client().get("/metrics").text
        lag = "nccr_guard_event_loop_lag_seconds"
        late = {b: metric(text, f"{lag}_count") - metric(text, f'{lag}_bucket{{le="{b}"}}') for b in ("0.1", "1.0")}
        print(
            f"\noverload: capacity {capacity:.1f} req/s, offered {len(results)} at {3 * capacity:.1f} req/s: "
            f"{dict(counts)}; event loops at worst {client_lag:.2f}s late (client), server's late by > 0.1 s / "
            f"> 1 s: {late['0.1']:.0f} / {late['1.0']:.0f} of {metric(text, f'{lag}_count'):.0f} samples; slowest: "
            + ", ".join(
                f"{r.code} {r.seconds:.2f}s (at {r.start:.1f}s, connect {r.connect_s:.2f}s, "
                f"server {r.wait_s:.2f}s, app {r.app_s:.2f}s)"
                for r in slowest
            )
        )
        lost = {c: n for c, n in counts.items() if c not in (200, 503, 504)}
        assert not lost, counts
        assert counts[200] >= 0.5 * capacity * 30 and counts[503] > 0
        # The app answers every request by its deadline. Outside the app a request also waits for the kernel and
        # for two busy event loops (the server's and this client's, sharing 2 cores with the model): on a busy CI
        # host that once came to 8 s (client 11.6 s, app 3.7 s), so the client-side bound only says nothing hangs.
        assert max(r.app_s for r in results) < 5 + 0.5, sorted(r.app_s for r in results)[-5:]
        assert slowest[0].seconds < 30, slowest
        assert metric(text, f"{lag}_count") > 100  # the server sampled its loop all along (every 0.1 s)
        for r in results:
            if r.code == 503:
                assert r.answer.headers.get("retry-after") and r.answer.json()["error"]
        t_end = time.monotonic()
        after = statistics.median(asyncio.run(closed_loop(s.url, body, 3, 1)))
        assert after < 2 * base + 0.05 and time.monotonic() - t_end < 10, (base, after)
        text = s.client().get("/metrics").text
        assert metric(text, "nccr_guard_queue_depth") == 0
    finally:
        s.stop_cleanly()


def test_clients_that_disconnect_free_their_queue_slots(tmp_path):
    # One clip per forward at all 18 rows (~0.1-0.2 s each here): the 8 queued clips take about a second, so
    # most of their clients give up while queued, whatever the host's speed (batched and sequential verdicts
    # finished all 8 inside the 0.3 s on a fast run, and nothing was counted).
    s = start_server(
        tmp_path,
        *("--models", str(SPEAKER), "--max-queue", "8", "--request-timeout-s", "20"),
        *("--max-batch", "18", "--no-sequential"),
    )
    body = clip()

    async def abandon(n: int):
        async with httpx.AsyncClient(base_url=s.url, timeout=0.3) as c:
            await asyncio.gather(
                *(c.post("/v1/detect", content=body, headers={"content-type": "audio/wav"}) for _ in range(n)),
                return_exceptions=True,
            )

    try:
        asyncio.run(abandon(40))  # every client gives up after 0.3 s, most while queued
        deadline = time.monotonic() + 15
        with s.client() as c:
            while metric(c.get("/metrics").text, "nccr_guard_queue_depth") > 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            text = c.get("/metrics").text
            assert metric(text, "nccr_guard_queue_depth") == 0
            assert metric(text, 'nccr_guard_rejections_total{reason="client_gone"}') >= 1
            codes = [
                c.post("/v1/detect", content=body, headers={"content-type": "audio/wav"}).status_code for _ in range(8)
            ]
            assert codes == [200] * 8
    finally:
        s.stop_cleanly()


@pytest.fixture
def faulty_model(tmp_path, mnist_v3) -> Path:
    """MNIST as nccr-v3 (4 rows per input), whose batches hold inputs whole at the tests' --max-batch."""
    return faulty_folder(tmp_path, mnist_v3)


def test_backend_fault_fails_only_its_batch(tmp_path, faulty_model, digit_pngs):
    clean = digit_pngs[0][0].read_bytes()
    poison = marked(clean, (0, 0))
    # Two inputs per forward, so that with one poisoned request in ten most batches stay clean.
    s = start_server(tmp_path, "--models", str(faulty_model), "--max-batch", "8", env={"PYTHONPATH": str(ROOT)})
    try:
        with s.client() as c:
            r = c.post("/v1/detect", content=poison, headers={"content-type": "image/png"})
            assert r.status_code == 503 and "failed on this batch" in r.json()["error"], r.text
            assert c.post("/v1/detect", content=clean, headers={"content-type": "image/png"}).status_code == 200

        async def mixed():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
                return await asyncio.gather(
                    *(
                        c.post(
                            "/v1/detect",
                            content=poison if i % 10 == 0 else clean,
                            headers={"content-type": "image/png"},
                        )
                        for i in range(100)
                    )
                )

        answers = asyncio.run(mixed())
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 503} and codes.count(200) >= 50, codes
        assert all(answers[i].status_code == 503 for i in range(0, 100, 10))
        with s.client() as c:
            assert c.post("/v1/detect", content=clean, headers={"content-type": "image/png"}).status_code == 200
            assert c.get("/v2/health/ready").status_code == 200
    finally:
        s.stop_cleanly()


def raw_request(
    port: int, head: bytes, body_chunks, pause_s: float = 0.0, read_timeout: float = 30
) -> tuple[bytes, int]:
    """Send a request by hand; returns (what the server answered, body bytes we managed to send)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
                sent += len(chunk)
                if pause_s:
                    time.sleep(pause_s)
        except OSError:  # the server closed on us: expected once it has answered
            pass
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
    return data, sent


def test_one_gigabyte_bodies_are_refused_early(server):
    port = int(server.url.rsplit(":", 1)[1])
    gb = 1 << 30
    head = f"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {gb}\r\n\r\n".encode()
    reply, sent = raw_request(port, head, (b"\0" * (1 << 20) for _ in range(1024)))
    assert reply.startswith(b"HTTP/1.1 413") and sent < 64 << 20, (reply[:200], sent)
    chunked = b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
    mb = b"\0" * (1 << 20)
    reply, sent = raw_request(port, chunked, (b"100000\r\n" + mb + b"\r\n" for _ in range(1024)))
    assert reply.startswith(b"HTTP/1.1 413") and sent < 64 << 20, (reply[:200], sent)
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_slowloris_upload_is_cut_by_the_read_timeout(tmp_path):
    s = start_server(tmp_path, "--models", str(MNIST), "--request-timeout-s", "2")
    port = int(s.url.rsplit(":", 1)[1])
    head = b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n"
    try:
        t0 = time.monotonic()
        reply, sent = raw_request(port, head, (b"\x89" for _ in range(20)), pause_s=0.5)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert time.monotonic() - t0 < 12 and sent < 20
        assert httpx.get(f"{s.url}/v2/health/ready").status_code == 200
    finally:
        s.stop_cleanly()


def test_batch_answers_every_item_by_the_deadline(tmp_path, faulty_model, digit_pngs):
    """A batch request of four items, the first stuck in a 3 s forward: all come back by the 1.5 s deadline, the
    items of the stuck one's part (ModelRuntime.parts: one input per forward here, one part per batch worker)
    with 504, the others with their verdicts."""
    clean = digit_pngs[0][0].read_bytes()
    files = [("file", ("slow.png", marked(clean, (0, -1)), "image/png"))]
    files += [("file", (f"{i}.png", p.read_bytes(), "image/png")) for i, (p, _) in enumerate(digit_pngs[:3])]
    s = start_server(
        tmp_path,
        *("--models", str(faulty_model), "--max-batch", "4", "--request-timeout-s", "1.5"),
        env={"PYTHONPATH": str(ROOT)},
    )
    try:
        with s.client() as c:
            stuck = request_parts(c.get("/v1/models/faulty").json(), len(files))[0]
            assert stuck < len(files)  # more than one batch worker: another part exists
            t = time.monotonic()
            r = c.post("/v1/detect/batch", files=files)
            took = time.monotonic() - t
            assert r.status_code == 200, r.text
            res = r.json()["results"]
            assert [x["status"] for x in res] == [504] * stuck + [200] * (len(files) - stuck), res
            assert [x["result"]["prediction"]["index"] for x in res[stuck:]] == [lbl for _, lbl in digit_pngs[:3]][
                stuck - 1 :
            ]
            assert all("timed out" in x["error"] for x in res[:stuck]) and took < 1.5 + 1.0, took
            time.sleep(2)  # the stalled forward ends; the server is whole again
            assert c.post("/v1/detect", content=clean, headers={"content-type": "image/png"}).status_code == 200
    finally:
        s.stop_cleanly()


def read_answer(sock: socket.socket) -> bytes:
    """One HTTP answer (head and Content-Length body) from a socket that stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b""
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(v for k, v in (h.split(b":", 1) for h in head.split(b"\r\n")[1:]) if k.lower() == b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_full_queue_refuses_uploads_from_their_headers(tmp_path, faulty_model, digit_pngs):
    """The image model's queue held full (stalled 3 s forwards, --max-queue 1), the speaker's free: an upload that
    can only go to the image model is answered 503 with Retry-After from its headers alone, its body never sent —
    a raw image/* body, `?model=faulty` on /v1/detect and /v1/detect/batch, KServe v2 infer. The connection stays
    usable: the unread body is discarded and the next request on it is served. A multipart body with no model
    named could be audio, so it is read (then refused at the queue, as before), and audio is still scored. Once
    the stalls end, images are scored again."""
    clean = digit_pngs[0][0].read_bytes()
    stall = marked(clean, (0, -1))
    flags = ("--max-batch", "4", "--max-queue", "1", "--request-timeout-s", "20")
    s = start_server(tmp_path, "--models", str(faulty_model), str(SPEAKER), *flags, env={"PYTHONPATH": str(ROOT)})
    port = int(s.url.rsplit(":", 1)[1])
    held = threading.Event()
    depth = 'nccr_guard_queue_depth{model="faulty"}'

    async def stalls(sent: list) -> list[int]:
        """Stalled uploads one by one, 0.2 s apart, until one waits in the queue: every batch worker busy."""
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
            post = c.post("/v1/detect", content=stall, headers={"content-type": "image/png"})
            for _ in range(12):
                sent.append(asyncio.ensure_future(post))
                await asyncio.sleep(0.2)
                if metric((await c.get("/metrics")).text, re.escape(depth)) >= 1:
                    break
                post = c.post("/v1/detect", content=stall, headers={"content-type": "image/png"})
            held.set()
            return [r.status_code for r in await asyncio.gather(*sent)]

    early = {
        "/v1/detect": "image/png",
        "/v1/detect?model=faulty": "multipart/form-data; boundary=xyz",
        "/v1/detect/batch?model=faulty": "multipart/form-data; boundary=xyz",
        "/v2/models/faulty/infer": "application/json",
    }
    try:
        with ThreadPoolExecutor(1) as pool:
            codes = pool.submit(asyncio.run, stalls([]))
            assert held.wait(10)
            with s.client() as c:
                assert metric(c.get("/metrics").text, re.escape(depth)) == 1
                before = metric(c.get("/metrics").text, 'nccr_guard_rejections_total{reason="queue_full"}')
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                for path, ctype in early.items():
                    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: 100\r\n"
                    sock.sendall(head.encode() + b"\r\n")
                    t = time.monotonic()
                    answer = read_answer(sock)  # nothing of the body sent yet; a body read would time out
                    assert answer.startswith(b"HTTP/1.1 503"), (path, answer[:300])
                    assert b"retry-after: 1" in answer.lower() and b"at capacity" in answer, answer
                    assert time.monotonic() - t < 2
                    sock.sendall(b"-" * 100)  # the body after all: discarded, the connection goes on
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_answer(sock).startswith(b"HTTP/1.1 200")
            with s.client() as c:  # the speaker has room: multipart bodies are read, audio is scored
                r = c.post("/v1/detect", files={"file": ("d.png", clean, "image/png")})
                assert r.status_code == 503 and "at capacity" in r.json()["error"], r.text
                r = c.post("/v1/detect", content=clip(), headers={"content-type": "audio/wav"})
                assert r.status_code == 200 and r.json()["model"] == "speaker", r.text
            codes = codes.result()
        assert set(codes) == {200}, codes
        with s.client() as c:
            after = metric(c.get("/metrics").text, 'nccr_guard_rejections_total{reason="queue_full"}')
            assert after - before >= 5
            r = c.post("/v1/detect", files={"file": ("d.png", clean, "image/png")})
            assert r.status_code == 200 and r.json()["prediction"]["index"] == digit_pngs[0][1], r.text
    finally:
        s.stop_cleanly()
