"""engine/event_stream.py: a worker's events pushed to the router over a socket (steps 1-5), and the
router's side of it (router/liveness.py: reconnecting, falling back to polling, a dead worker)."""
from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest

from engine.event_stream import EventOutbox, EventStream, decode, encode
from engine.types import DecodeEvent, FinishReason, SamplingParams, TokenLogprob
from router.config import LimitsConfig
from router.dispatcher import Dispatcher, WorkerFailure, WorkerRef
from router.validation import ValidRequest
from tests.cpu.test_dispatcher import FakeDecode, FakePrefill, _Method


def _connect(stream: EventStream, secret: str) -> socket.socket:
    c = socket.create_connection((stream.host, stream.port), timeout=5)
    c.sendall(secret.encode() + b"\n")
    return c


def _frame(c: socket.socket) -> list[DecodeEvent] | None:
    """The next frame's events; None when the worker closed the connection."""
    def exactly(n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            part = c.recv(n - len(buf))
            if not part:
                return None
            buf += part
        return buf

    head = exactly(4)
    if head is None:
        return None
    body = exactly(struct.unpack(">I", head)[0])
    assert body is not None
    return decode(body)


def _tokens(c: socket.socket, want: int, within_s: float = 5) -> list[int]:
    got: list[int] = []
    end = time.monotonic() + within_s
    while len(got) < want:
        assert time.monotonic() < end, f"{got} after {within_s}s"
        events = _frame(c)
        assert events is not None, "connection closed"
        got += [t for e in events for t in e.token_ids]
    return got


def test_frames_carry_every_field_of_an_event() -> None:
    events = [
        DecodeEvent("a", [1, 2]),
        DecodeEvent("b", [3], FinishReason.LENGTH, kv_transfer_ms=1.5, kv_bytes=4096),
        DecodeEvent("c", [], FinishReason.ERROR, "step failed: boom \u00e9"),
        DecodeEvent("d", [7], FinishReason.STOP, logprobs=[TokenLogprob(7, -0.25, ((7, -0.25), (9, -1.5)))]),
        DecodeEvent("e", [8], logprobs=[TokenLogprob(8, -0.5)]),
    ]
    frame = encode(events)
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert decode(frame[4:]) == events


def test_events_reach_the_router_in_order_and_an_idle_stream_carries_heartbeats() -> None:
    ev = EventOutbox()
    stream = EventStream(ev.poll, ev.put_back, host="127.0.0.1")
    try:
        c = _connect(stream, stream.secret)
        for i in range(50):
            ev.emit([DecodeEvent("r", [i])])
        assert _tokens(c, 50) == list(range(50))
        t0 = time.monotonic()
        assert _frame(c) == []  # nothing to say: an empty frame within a heartbeat
        assert time.monotonic() - t0 < 2
        c.close()
    finally:
        stream.close()


def test_a_connection_without_the_secret_gets_nothing() -> None:
    ev = EventOutbox()
    stream = EventStream(ev.poll, ev.put_back, host="127.0.0.1")
    try:
        bad = _connect(stream, "0" * len(stream.secret))
        ev.emit([DecodeEvent("r", [1])])
        assert _frame(bad) is None  # closed without a frame
        good = _connect(stream, stream.secret)
        assert _tokens(good, 1) == [1]  # the event waited for the router
        good.close()
    finally:
        stream.close()


def test_events_emitted_after_the_router_hung_up_wait_for_its_next_connection() -> None:
    ev = EventOutbox()
    stream = EventStream(ev.poll, ev.put_back, host="127.0.0.1")
    try:
        first = _connect(stream, stream.secret)
        ev.emit([DecodeEvent("r", [0])])
        assert _tokens(first, 1) == [0]
        first.close()
        time.sleep(0.05)
        for i in range(1, 20):
            ev.emit([DecodeEvent("r", [i])])
            time.sleep(0.001)
        second = _connect(stream, stream.secret)
        assert _tokens(second, 19) == list(range(1, 20))  # none lost, in order
        second.close()
    finally:
        stream.close()


# -- the router's side (router/liveness.py `_pump`), with a stand-in worker handle --------------------
class StreamingDecode(FakeDecode):
    """FakeDecode whose events go over an EventStream; `poll` is counted (the fallback)."""

    def __init__(self, reachable: bool = True) -> None:
        super().__init__(room=8)
        self.out = EventOutbox()
        self.stream: EventStream | None = None
        self.reachable, self.gone, self.polls, self.cannot_listen = reachable, False, 0, False
        self.open_event_stream, self.ready = _Method(self._open), _Method(self._ready)
        self.poll = _Method(self._poll_out)

    def emit(self, ev: DecodeEvent) -> None:
        self.out.emit([ev])

    async def _open(self) -> tuple[str, int, str]:
        if self.gone:
            raise ActorDiedError("the actor died")
        if self.cannot_listen:
            raise OSError("Cannot assign requested address")
        if self.stream is None or self.stream._closed:  # a new one after close(), as after a restart
            self.stream = EventStream(self.out.poll, self.out.put_back, host="127.0.0.1")
        if not self.reachable:
            with socket.socket() as s:  # a port nothing listens on
                s.bind(("127.0.0.1", 0))
                return "127.0.0.1", s.getsockname()[1], self.stream.secret
        return self.stream.host, self.stream.port, self.stream.secret

    async def _ready(self) -> str:
        if self.gone:
            raise ActorDiedError("the actor died")
        return "boot"

    async def _poll_out(self, timeout: float) -> list[DecodeEvent]:
        self.polls += 1
        return await asyncio.get_running_loop().run_in_executor(None, self.out.poll, min(timeout, 0.05))


class ActorDiedError(Exception):
    """Ray's error for a dead actor, matched by name as router/liveness.py does."""


async def _run(d: Dispatcher, rid: str, max_tokens: int) -> list[int]:
    req = ValidRequest(rid, [1, 2, 3], SamplingParams(max_tokens=max_tokens), (), rid)
    return [t async for c in d.run(req) for t in c.token_ids]


def _dispatcher(dec: StreamingDecode) -> Dispatcher:
    # queue_timeout_s: how long a request of a lost worker waits for another to adopt it
    return Dispatcher([WorkerRef("prefill-0", FakePrefill())], [WorkerRef("decode-0", dec)], (2,),
                      LimitsConfig(request_timeout_s=10, queue_timeout_s=0.5))


def test_the_router_reads_events_from_the_stream_and_reconnects_when_it_breaks() -> None:
    async def main() -> None:
        dec = StreamingDecode()
        d = _dispatcher(dec)
        d.start()
        run = asyncio.create_task(_run(d, "r", 40))
        await asyncio.sleep(0.2)
        for i in range(10):
            dec.emit(DecodeEvent("r", [100 + i]))
        await asyncio.sleep(0.2)
        dec.stream.close()  # the connection ends, the worker lives: the router connects again
        for i in range(10, 38):
            dec.emit(DecodeEvent("r", [100 + i]))
        dec.emit(DecodeEvent("r", [138], FinishReason.LENGTH))
        assert await asyncio.wait_for(run, 10) == [5] + [100 + i for i in range(39)]
        assert dec.polls == 0  # all of it came over the socket
        await d.close()
        dec.stream.close()

    asyncio.run(main())


@pytest.mark.parametrize("why", ["unreachable", "cannot listen"])
def test_a_stream_that_cannot_be_reached_falls_back_to_polling_through_ray(why: str) -> None:
    async def main() -> None:
        dec = StreamingDecode(reachable=why != "unreachable")
        dec.cannot_listen = why == "cannot listen"
        d = _dispatcher(dec)
        d.start()
        run = asyncio.create_task(_run(d, "r", 4))
        await asyncio.sleep(0.2)
        for i in range(2):
            dec.emit(DecodeEvent("r", [100 + i]))
        dec.emit(DecodeEvent("r", [102], FinishReason.LENGTH))
        assert await asyncio.wait_for(run, 10) == [5, 100, 101, 102]
        assert dec.polls > 0
        await d.close()
        if dec.stream is not None:
            dec.stream.close()

    asyncio.run(main())


def test_a_stream_ending_because_the_worker_died_fails_its_requests_at_once() -> None:
    async def main() -> None:
        dec = StreamingDecode()
        d = _dispatcher(dec)
        d.start()
        run = asyncio.create_task(_run(d, "r", 40))
        await asyncio.sleep(0.2)
        dec.emit(DecodeEvent("r", [100]))
        await asyncio.sleep(0.2)
        dec.gone = True
        dec.stream.close()
        t0 = time.monotonic()
        with pytest.raises(WorkerFailure, match="decode-0 is gone"):  # no other worker adopted it
            await asyncio.wait_for(run, 10)
        assert time.monotonic() - t0 < 3  # found gone at once, not at the request's deadline (10 s)
        assert "decode-0" in d.dead
        await d.close()

    asyncio.run(main())
