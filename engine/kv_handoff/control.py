"""Steps 3 and 5 of the hand-off (begin_write, end_write) over a socket between the two workers.

As a Ray actor call, each of them took ~1.2 ms to arrive and as long to answer (`bench/handoff.py`
with a 16-token prompt: 4.2 ms from the prefill's ask to the decode loop seeing its KV landed, all
of it the two calls), and GIL time from the decode worker's step loop. Over a TCP connection of
their own they take ~0.1 ms, as the decode worker's events do (engine/event_stream.py):

  1. the decode worker listens on its node's address (ControlServer) and names (host, port,
     secret) in the DecodeEndpoint it publishes through Ray; the launcher gives each prefill worker
     a SocketPeer on it, with the Ray peer behind it
  2. the SocketPeer connects at its first call and sends the secret as its first frame; a
     connection that does not is closed; one connection per link, one call at a time on it (a
     link's transfer thread makes its calls in order)
  3. a call is a frame (4-byte length, then JSON: never pickle, a worker must not run what a socket
     sends it) naming the op and the message's fields; the answer is one frame: the WriteGrant's
     fields for "begin", {} for "end", or {"error": ...} if the decode worker raised
  4. a call that cannot be sent (no connection can be made) goes through Ray instead, and so does
     every later one on that link; a call sent whose answer does not come within its timeout, or
     whose connection breaks, raises, as a Ray call to a dead actor would (the write then fails,
     as step 3 or 5 says), and the next call connects again
"""
from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import secrets
import socket
import struct
import threading
import time
from typing import Any

from engine.kv_handoff.types import Backend, ControlAddress, WriteGrant, WriteIntent, WriteOutcome
from engine.sockets import shut_down

log = logging.getLogger(__name__)
LENGTH = struct.Struct(">I")
MAX_FRAME = 1 << 16  # bytes: a call is a few hundred; anything longer is not from a prefill worker
CONNECT_TIMEOUT_S = 2.0
HELLO_TIMEOUT_S = 10.0  # a connection must send its secret within this


def write_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    body = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(LENGTH.pack(len(body)) + body)


def read_frame(sock: socket.socket) -> dict[str, Any]:
    """One frame's JSON object; ConnectionError at the end of the stream, ValueError if malformed."""
    (n,) = LENGTH.unpack(_exactly(sock, LENGTH.size))
    if n > MAX_FRAME:
        raise ValueError(f"a frame of {n} bytes (at most {MAX_FRAME})")
    obj = json.loads(_exactly(sock, n))
    if not isinstance(obj, dict):
        raise ValueError("a frame that is not a JSON object")
    return obj


def _exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("the connection ended")
        buf += part
    return buf


def _intent(d: dict[str, Any]) -> WriteIntent:
    return WriteIntent(**{**d, "backend": Backend(d["backend"])})


class ControlServer:
    """Decode side of steps 1-3: answers the calls of every prefill worker's link, a thread per
    connection, by calling `handler` (the decode worker: its begin_write/end_write are thread-safe)."""

    def __init__(self, handler: Any, host: str) -> None:
        self.handler = handler
        self.secret = secrets.token_hex(16)
        self._sock = socket.create_server((host, 0))
        self.address = ControlAddress(host, int(self._sock.getsockname()[1]), self.secret)
        self.calls = 0  # answered over sockets
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="handoff-control", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        shut_down(self._sock)  # wakes the accept() in progress (close alone does not)
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            shut_down(c)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), name="handoff-control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            with self._lock:
                self._conns.add(conn)
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.settimeout(HELLO_TIMEOUT_S)
                hello = read_frame(conn)  # 2. the secret first
                if not hmac.compare_digest(str(hello.get("secret", "")).encode(), self.secret.encode()):
                    log.warning("hand-off control: a connection without the secret was closed")
                    return
                conn.settimeout(None)  # a link may stay quiet for as long as no prompt comes
                while not self._closed:
                    write_frame(conn, self._answer(read_frame(conn)))  # 3.
            except (OSError, ValueError) as e:  # ConnectionError is an OSError: the link went
                if not self._closed:
                    log.info("hand-off control: a connection ended (%s)", e)
            finally:
                with self._lock:
                    self._conns.discard(conn)

    def _answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        try:
            op = msg.get("op")
            if op == "begin":
                grant = self.handler.begin_write(_intent(msg["intent"]))
                answer = dataclasses.asdict(grant)
            elif op == "end":
                self.handler.end_write(WriteOutcome(**msg["outcome"]))
                answer = {}
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:  # noqa: BLE001 — the caller's call fails with it, as a Ray call would
            log.exception("hand-off control: a call failed")
            return {"error": f"{type(e).__name__}: {e}"}
        self.calls += 1
        return answer


class SocketPeer:
    """Prefill side (a DecodePeer): the calls go over the decode worker's control socket; through
    `fallback` (the Ray peer) when no connection to it can be made (step 4)."""

    def __init__(self, address: ControlAddress, fallback: Any) -> None:
        self.address, self.fallback = address, fallback
        self.socket_calls = 0
        self.fallback_calls = 0
        self._sock: socket.socket | None = None
        self._unreachable = False  # a connection could not be made: Ray from here on
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # built by the launcher, used in the prefill worker
        return {"address": self.address, "fallback": self.fallback}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["address"], state["fallback"])  # type: ignore[misc]

    def begin_write(self, intent: WriteIntent, timeout_s: float) -> WriteGrant:
        answer = self._call({"op": "begin", "intent": dataclasses.asdict(intent)}, timeout_s)
        if answer is None:
            return self.fallback.begin_write(intent, timeout_s)  # type: ignore[no-any-return]
        return WriteGrant(**answer)

    def end_write(self, outcome: WriteOutcome, timeout_s: float) -> None:
        if self._call({"op": "end", "outcome": dataclasses.asdict(outcome)}, timeout_s) is None:
            self.fallback.end_write(outcome, timeout_s)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _call(self, msg: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """The answer; None when the call was not sent (no connection): the caller uses Ray."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if self._sock is None and not self._unreachable:
                try:
                    self._sock = self._connect(min(timeout_s, CONNECT_TIMEOUT_S))
                except OSError as e:
                    self._unreachable = True
                    log.warning("hand-off control: %s:%d unreachable (%s); its calls go through Ray",
                                self.address.host, self.address.port, e)
            if self._sock is None:
                self.fallback_calls += 1
                return None
            try:
                self._sock.settimeout(max(1e-3, deadline - time.monotonic()))
                write_frame(self._sock, msg)
                self._sock.settimeout(max(1e-3, deadline - time.monotonic()))
                answer = read_frame(self._sock)
            except (OSError, ValueError) as e:  # sent, perhaps run: not repeated through Ray
                self._drop()
                raise ConnectionError(f"hand-off control call {msg['op']} to {self.address.host}:"
                                      f"{self.address.port} got no answer: {type(e).__name__}: {e}") from None
            self.socket_calls += 1
        if "error" in answer:
            raise RuntimeError(f"the decode worker failed the {msg['op']} call: {answer['error']}")
        return answer

    def _connect(self, timeout_s: float) -> socket.socket:
        sock = socket.create_connection((self.address.host, self.address.port), timeout=timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        write_frame(sock, {"secret": self.address.secret})
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
