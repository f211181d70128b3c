"""engine/event_stream.py: a worker's events pushed to the router over a socket (steps 1-5), and the
router's side of it (router/liveness.py: reconnecting, falling back to polling, a dead worker)."""
from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from engine.event_stream import ACK, HEADER, EventBatch, EventOutbox, EventStream, decode, encode
from engine.types import DecodeEvent, FinishReason, SamplingParams, TokenLogprob
from router.config import LimitsConfig
from router.dispatcher import Dispatcher, WorkerFailure, WorkerRef
from router.validation import ValidRequest
from tests.cpu.test_dispatcher import FakeDecode, FakePrefill, _Method


def _connect(stream: EventStream, secret: str, log: str = "-", acked: int = 0) -> socket.socket:
    c = socket.create_connection((stream.host, stream.port), timeout=5)
    c.sendall(f"{secret} {log} {acked}\n".encode())
    return c


def _numbered(c: socket.socket) -> tuple[int, list[DecodeEvent]] | None:
    """The next frame (number, events); None when the worker closed the connection."""
    def exactly(n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            part = c.recv(n - len(buf))
            if not part:
                return None
            buf += part
        return buf

    head = exactly(HEADER.size)
    if head is None:
        return None
    n, seq = HEADER.unpack(head)
    body = exactly(n)
    assert body is not None
    return seq, decode(body)


def _frame(c: socket.socket) -> list[DecodeEvent] | None:
    """The next frame's events; None when the worker closed the connection."""
    got = _numbered(c)
    return None if got is None else got[1]


def _tokens(c: socket.socket, want: int, within_s: float = 5) -> list[int]:
    got: list[int] = []
    end = time.monotonic() + within_s
    while len(got) < want:
        assert time.monotonic() < end, f"{got} after {within_s}s"
        events = _frame(c)
        assert events is not None, "connection closed"
        got += [t for e in events for t in e.token_ids]
    return got


Served = tuple[EventOutbox, EventStream]


@pytest.fixture
def served() -> Iterator[Served]:
    """A worker's outbox and its event stream on loopback (steps 1-4), closed after the test."""
    ev = EventOutbox()
    stream = EventStream(ev, host="127.0.0.1")
    yield ev, stream
    stream.close()


def test_frames_carry_every_field_of_an_event() -> None:
    events = [
        DecodeEvent("a", [1, 2]),
        DecodeEvent("b", [3], FinishReason.LENGTH, kv_transfer_ms=1.5, kv_bytes=4096),
        DecodeEvent("c", [], FinishReason.ERROR, "step failed: boom \u00e9"),
        DecodeEvent("d", [7], FinishReason.STOP, logprobs=[TokenLogprob(7, -0.25, ((7, -0.25), (9, -1.5)))]),
        DecodeEvent("e", [8], logprobs=[TokenLogprob(8, -0.5)]),
    ]
    frame = encode(7, events)
    assert HEADER.unpack(frame[:HEADER.size]) == (len(frame) - HEADER.size, 7)
    assert decode(frame[HEADER.size:]) == events


def test_events_reach_the_router_in_order_and_an_idle_stream_carries_heartbeats(served: Served) -> None:
    ev, stream = served
    c = _connect(stream, ev.secret)
    for i in range(50):
        ev.emit([DecodeEvent("r", [i])])
    assert _tokens(c, 50) == list(range(50))
    t0 = time.monotonic()
    assert _frame(c) == []  # nothing to say: an empty frame within a heartbeat
    assert time.monotonic() - t0 < 2
    c.close()


def test_a_connection_without_the_secret_gets_nothing(served: Served) -> None:
    ev, stream = served
    bad = _connect(stream, "0" * len(ev.secret))
    ev.emit([DecodeEvent("r", [1])])
    assert _frame(bad) is None  # closed without a frame
    good = _connect(stream, ev.secret)
    assert _tokens(good, 1) == [1]  # the event waited for the router
    good.close()


def test_frames_the_router_did_not_acknowledge_come_again_on_its_next_connection(served: Served) -> None:
    ev, stream = served
    first = _connect(stream, ev.secret)
    ev.emit([DecodeEvent("r", [0])])
    assert _numbered(first) == (1, [DecodeEvent("r", [0])])
    for i in range(1, 4):
        ev.emit([DecodeEvent("r", [i])])
        time.sleep(0.01)  # one frame each, written before the router hangs up unread
    first.close()
    time.sleep(0.05)
    for i in range(4, 20):
        ev.emit([DecodeEvent("r", [i])])
        time.sleep(0.001)
    second = _connect(stream, ev.secret, ev.log, 1)  # the router delivered frame 1
    assert _tokens(second, 19) == list(range(1, 20))  # none lost, none twice, in order
    second.close()
    third = _connect(stream, ev.secret, ev.log, 1)  # nothing acknowledged past 1: all of that again
    assert _tokens(third, 19) == list(range(1, 20))
    third.sendall(ACK.pack(ev.unacked()[-1][0]))  # 4. acknowledged: forgotten
    end = time.monotonic() + 5
    while ev.unacked() and time.monotonic() < end:
        time.sleep(0.01)
    assert ev.unacked() == []
    third.close()


def test_a_poll_answers_every_frame_after_the_routers_last_of_its_log() -> None:
    ev = EventOutbox()
    ev.emit([DecodeEvent("r", [0])])
    first = ev.poll(0.01)
    assert (first.log, first.seq, [e.token_ids for e in first.events]) == (ev.log, 1, [[0]])
    ev.emit([DecodeEvent("r", [1])])
    again = ev.poll(0.01, "another log", first.seq)  # an ack of another log (a restarted worker's) counts for nothing
    assert [e.token_ids for e in again.events] == [[0], [1]] and again.seq == 2
    ev.emit([DecodeEvent("r", [2])])
    assert [e.token_ids for e in ev.poll(0.01, ev.log, 2).events] == [[2]]
    t0 = time.monotonic()
    assert ev.poll(0.1, ev.log, 3) == EventBatch(ev.log, 3, [])  # nothing owed: it waits, then answers none
    assert time.monotonic() - t0 >= 0.09 and ev.unacked() == []


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

    async def _open(self) -> tuple[str, int, str, str]:
        if self.gone:
            raise ActorDiedError("the actor died")
        if self.cannot_listen:
            raise OSError("Cannot assign requested address")
        if self.stream is None or self.stream._closed:  # a new one after close(), as after a restart
            self.stream = EventStream(self.out, host="127.0.0.1")
        if not self.reachable:
            with socket.socket() as s:  # a port nothing listens on
                s.bind(("127.0.0.1", 0))
                return "127.0.0.1", s.getsockname()[1], self.out.secret, self.out.log
        return self.stream.host, self.stream.port, self.out.secret, self.out.log

    async def _ready(self) -> str:
        if self.gone:
            raise ActorDiedError("the actor died")
        return "boot"

    async def _poll_out(self, timeout: float, log: str, acked: int) -> EventBatch:
        self.polls += 1
        return await asyncio.get_running_loop().run_in_executor(None, self.out.poll, min(timeout, 0.05), log, acked)


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
        for _ in range(100):  # 4. acknowledged on the next heartbeat: the worker keeps none of it
            if not dec.out.unacked():
                break
            await asyncio.sleep(0.02)
        assert dec.out.unacked() == []
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


def test_a_frame_read_but_not_delivered_when_the_connection_broke_comes_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection breaks with a frame in the router's hands but not yet delivered (as when it
    breaks with the frame still in the router's socket buffer): the frame comes again, once."""
    import router.liveness as liveness

    real, broke = liveness.decode_events, []

    def breaks_once(body: bytes) -> list[DecodeEvent]:
        events = real(body)
        if events and not broke:
            broke.append(events)
            raise ConnectionResetError("connection reset by peer")
        return events

    monkeypatch.setattr(liveness, "decode_events", breaks_once)

    dec = StreamingDecode()
    assert asyncio.run(_four_tokens(dec, gap_s=0.2)) == [5, 100, 101, 102]
    assert broke and dec.polls == 0


def test_events_of_a_poll_whose_answer_was_lost_come_with_the_next_poll() -> None:
    """Polling through Ray: the worker handed events over but the answer never reached the router
    (its call timed out): they come with the next poll, once."""
    dec = StreamingDecode(reachable=False)
    lost = []
    answer = dec.poll.fn

    async def loses_one(*args: object) -> EventBatch:
        got = await answer(*args)
        if not lost and got.events:
            lost.append(got)
            raise TimeoutError("no answer within 30 s")
        return got

    dec.poll = _Method(loses_one)
    assert asyncio.run(_four_tokens(dec, gap_s=0.5)) == [5, 100, 101, 102]
    assert lost and dec.polls > 1


async def _four_tokens(dec: StreamingDecode, gap_s: float) -> list[int]:
    """A request of four tokens through a dispatcher over `dec`: the prefill's, then 100; gap_s
    later 101 and 102, the last."""
    d = _dispatcher(dec)
    d.start()
    try:
        run = asyncio.create_task(_run(d, "r", 4))
        await asyncio.sleep(0.2)
        dec.emit(DecodeEvent("r", [100]))
        await asyncio.sleep(gap_s)
        dec.emit(DecodeEvent("r", [101]))
        dec.emit(DecodeEvent("r", [102], FinishReason.LENGTH))
        return await asyncio.wait_for(run, 10)
    finally:
        await d.close()
        if dec.stream is not None:
            dec.stream.close()
