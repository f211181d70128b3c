"""engine/event_stream.py: a worker's events pushed to the router over a socket (steps 1-5)."""
from __future__ import annotations

import socket
import struct
import threading
import time

from engine.event_stream import EventStream, decode, encode
from engine.types import DecodeEvent, FinishReason, TokenLogprob


class Events:
    """A worker's event list, as BatchWorker keeps it (poll / put back)."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.events: list[DecodeEvent] = []

    def emit(self, *events: DecodeEvent) -> None:
        with self.cv:
            self.events.extend(events)
            self.cv.notify_all()

    def take(self, timeout_s: float) -> list[DecodeEvent]:
        with self.cv:
            if not self.events:
                self.cv.wait(timeout_s)
            out, self.events = self.events, []
        return out

    def put_back(self, events: list[DecodeEvent]) -> None:
        with self.cv:
            self.events[:0] = events


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
    ev = Events()
    stream = EventStream(ev.take, ev.put_back, host="127.0.0.1")
    try:
        c = _connect(stream, stream.secret)
        for i in range(50):
            ev.emit(DecodeEvent("r", [i]))
        assert _tokens(c, 50) == list(range(50))
        t0 = time.monotonic()
        assert _frame(c) == []  # nothing to say: an empty frame within a heartbeat
        assert time.monotonic() - t0 < 2
        c.close()
    finally:
        stream.close()


def test_a_connection_without_the_secret_gets_nothing() -> None:
    ev = Events()
    stream = EventStream(ev.take, ev.put_back, host="127.0.0.1")
    try:
        bad = _connect(stream, "0" * len(stream.secret))
        ev.emit(DecodeEvent("r", [1]))
        assert _frame(bad) is None  # closed without a frame
        good = _connect(stream, stream.secret)
        assert _tokens(good, 1) == [1]  # the event waited for the router
        good.close()
    finally:
        stream.close()


def test_events_emitted_after_the_router_hung_up_wait_for_its_next_connection() -> None:
    ev = Events()
    stream = EventStream(ev.take, ev.put_back, host="127.0.0.1")
    try:
        first = _connect(stream, stream.secret)
        ev.emit(DecodeEvent("r", [0]))
        assert _tokens(first, 1) == [0]
        first.close()
        time.sleep(0.05)
        for i in range(1, 20):
            ev.emit(DecodeEvent("r", [i]))
            time.sleep(0.001)
        second = _connect(stream, stream.secret)
        assert _tokens(second, 19) == list(range(1, 20))  # none lost, in order
        second.close()
    finally:
        stream.close()
