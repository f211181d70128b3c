"""Steps 3 and 5 of the hand-off over the decode worker's control socket (engine/kv_handoff/control.py)."""
from __future__ import annotations

import pickle
import socket
import threading
import time
from typing import Any

import pytest

from engine.kv_handoff import Backend, ControlAddress, ControlServer, SocketPeer, WriteGrant, WriteIntent, WriteOutcome
from engine.kv_handoff.control import LENGTH, write_frame

INTENT = WriteIntent("r1", "prefill-0", 37, 42, Backend.GLOO, epoch=3, sent_at=123.5, first_block=2)


class Handler:
    """Stands in for the decode worker: records the calls, answers as told."""

    def __init__(self) -> None:
        self.begins: list[WriteIntent] = []
        self.ends: list[WriteOutcome] = []
        self.gate: threading.Event | None = None  # set: begin_write waits for it
        self.fail: str = ""

    def begin_write(self, intent: WriteIntent, timeout_s: float = 0.0) -> WriteGrant:
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise ValueError(self.fail)
        self.begins.append(intent)
        return WriteGrant(True, "", epoch=intent.epoch + 1)

    def end_write(self, outcome: WriteOutcome, timeout_s: float = 0.0) -> None:
        self.ends.append(outcome)


class Fallback(Handler):
    """Ray's place behind a SocketPeer."""


@pytest.fixture
def served():  # type: ignore[no-untyped-def]
    h = Handler()
    server = ControlServer(h, "127.0.0.1")
    yield h, server
    server.close()


def test_calls_arrive_as_sent_and_answer_as_the_worker_answered(served) -> None:  # type: ignore[no-untyped-def]
    h, server = served
    fb = Fallback()
    peer = SocketPeer(server.address, fb)
    assert peer.begin_write(INTENT, 5) == WriteGrant(True, "", epoch=4)
    out = WriteOutcome("r1", "prefill-0", False, "boom", nbytes=7)
    peer.end_write(out, 5)
    assert h.begins == [INTENT] and isinstance(h.begins[0].backend, Backend)
    assert h.ends == [out]
    assert server.calls == 2 and peer.socket_calls == 2
    assert peer.fallback_calls == 0 and not fb.begins and not fb.ends


def test_a_connection_without_the_secret_is_closed_and_nothing_runs(served) -> None:  # type: ignore[no-untyped-def]
    h, server = served
    a = server.address
    peer = SocketPeer(ControlAddress(a.host, a.port, "not-the-secret"), Fallback())
    with pytest.raises(ConnectionError, match="got no answer"):  # sent: it is not repeated through Ray
        peer.begin_write(INTENT, 5)
    assert h.begins == [] and server.calls == 0 and peer.fallback_calls == 0


def test_a_decode_worker_that_cannot_be_reached_is_called_through_ray_from_then_on() -> None:
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    fb = Fallback()
    peer = SocketPeer(ControlAddress("127.0.0.1", port, "x"), fb)
    assert peer.begin_write(INTENT, 5) == WriteGrant(True, "", epoch=4)
    peer.end_write(WriteOutcome("r1", "prefill-0", True, nbytes=1), 5)
    assert fb.begins == [INTENT] and len(fb.ends) == 1
    assert peer.fallback_calls == 2 and peer.socket_calls == 0


def test_an_answer_that_does_not_come_in_time_raises_and_the_next_call_connects_again(served) -> None:  # type: ignore[no-untyped-def]
    h, server = served
    peer = SocketPeer(server.address, Fallback())
    h.gate = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="got no answer"):
        peer.begin_write(INTENT, 0.3)
    assert time.monotonic() - t0 < 3
    h.gate.set()  # the late call runs on the server; its answer goes to a closed connection
    h.gate = None
    assert peer.begin_write(INTENT, 5).ok
    assert peer.fallback_calls == 0


def test_a_call_the_worker_raised_on_fails_with_its_error_and_the_connection_serves_on(served) -> None:  # type: ignore[no-untyped-def]
    h, server = served
    peer = SocketPeer(server.address, Fallback())
    h.fail = "no such request"
    with pytest.raises(RuntimeError, match="ValueError: no such request"):
        peer.begin_write(INTENT, 5)
    h.fail = ""
    assert peer.begin_write(INTENT, 5).ok and peer.socket_calls == 2


@pytest.mark.parametrize("garbage", [LENGTH.pack(1 << 30), LENGTH.pack(5) + b"nope!", LENGTH.pack(2) + b"[]"])
def test_a_malformed_frame_ends_only_its_own_connection(served, garbage: bytes) -> None:  # type: ignore[no-untyped-def]
    h, server = served
    bad = socket.create_connection((server.address.host, server.address.port), timeout=5)
    write_frame(bad, {"secret": server.address.secret})
    bad.sendall(garbage)
    assert bad.recv(16) == b""  # closed by the server
    bad.close()
    good = SocketPeer(server.address, Fallback())
    assert good.begin_write(INTENT, 5).ok and h.begins == [INTENT]


def test_an_unknown_op_is_an_error_answer_not_a_crash(served) -> None:  # type: ignore[no-untyped-def]
    h, server = served
    peer = SocketPeer(server.address, Fallback())
    with pytest.raises(RuntimeError, match="unknown op"):
        peer._call({"op": "drop_table"}, 5)
    assert peer.begin_write(INTENT, 5).ok


def test_it_crosses_ray_as_a_pickle_without_its_connection(served) -> None:  # type: ignore[no-untyped-def]
    h, server = served
    peer = SocketPeer(server.address, Fallback())
    assert peer.begin_write(INTENT, 5).ok  # connected
    copy: Any = pickle.loads(pickle.dumps(peer))
    assert copy.address == server.address and copy._sock is None
    assert copy.begin_write(INTENT, 5).ok and server.calls == 2


def test_a_closed_server_fails_the_next_call_at_once(served) -> None:  # type: ignore[no-untyped-def]
    h, server = served
    peer = SocketPeer(server.address, Fallback())
    assert peer.begin_write(INTENT, 5).ok
    server.close()
    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        peer.begin_write(INTENT, 30)
    assert time.monotonic() - t0 < 5
