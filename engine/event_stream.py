"""A decode (or aggregated) worker's events, pushed to the router over one TCP connection.

A Ray actor call per step (the router's long poll) cost, with 64 events, ~0.25 ms of the router's
event loop, ~0.3 ms of its Ray I/O thread and ~0.45 ms of the worker's Python threads — GIL time
taken from its step loop — and 1.2 ms from call to answer; this stream costs ~0.05 ms on each side
and 0.07 ms (`python bench/ray_poll.py`). A worker at a GPU's pace emits a batch every few ms.
So, as vLLM and SGLang do between their engine and API processes, the events go over a plain
socket, the way in set up through Ray:

  1. the router calls `open_event_stream()` on the worker (a Ray call): the worker starts listening
     on its node's address, once, and answers (host, port, secret)
  2. the router connects and sends the secret; the worker checks it (a connection without it is
     closed); one router connection at a time: a newer one is taken when the older one fails
  3. the worker's sender thread takes what its steps emitted and writes it as one frame (4-byte
     length, then JSON: never pickle, the router must not run what a socket sends it); with nothing
     to send it writes an empty frame every `HEARTBEAT_S`, so either side finds a dead peer
  4. events taken after the router hung up (its close is looked for before each write), or in a
     frame that could not be written, are put back, in order, for the next connection
  5. the router reads frames until the connection ends, then asks the worker through Ray whether it
     is alive: gone → its requests fail or move (router/liveness.py); alive → again from 1, and
     after three tries that brought no frame it long-polls the worker through Ray instead
"""
from __future__ import annotations

import hmac
import json
import logging
import secrets
import select
import socket
import struct
import threading
from collections.abc import Callable

from engine.types import DecodeEvent, FinishReason, TokenLogprob

log = logging.getLogger(__name__)
HEARTBEAT_S = 0.25  # an idle connection carries an empty frame this often
SEND_TIMEOUT_S = 30.0  # a frame the router does not take within this: the connection is dropped
_LEN = struct.Struct(">I")


def encode(events: list[DecodeEvent]) -> bytes:
    """One frame: length, then the events as JSON arrays."""
    body = json.dumps([
        [e.request_id, e.token_ids, e.finish_reason.value if e.finish_reason is not None else None, e.error,
         e.kv_transfer_ms, e.kv_bytes,
         None if e.logprobs is None else [[lp.token_id, lp.logprob, lp.top] for lp in e.logprobs]]
        for e in events
    ], separators=(",", ":")).encode()
    return _LEN.pack(len(body)) + body


def decode(body: bytes) -> list[DecodeEvent]:
    """A frame's body (after its length) → events."""
    return [
        DecodeEvent(rid, tokens, FinishReason(reason) if reason is not None else None, error, kv_ms, kv_bytes,
                    None if lps is None else [TokenLogprob(t, v, tuple((a, b) for a, b in top)) for t, v, top in lps])
        for rid, tokens, reason, error, kv_ms, kv_bytes, lps in json.loads(body)
    ]


def node_address() -> str:
    """The address the router reaches this worker's node at (Ray's node IP; loopback without Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())
    except Exception as e:  # noqa: BLE001 — an address is all that is needed
        log.debug("no Ray node address: %s", e)
    return "127.0.0.1"


class EventOutbox:
    """A worker's events on their way to the router: its step loop emits them; the router takes
    them by `poll()` through Ray, or they go over the event stream once the router opened it."""

    def __init__(self) -> None:
        self._events: list[DecodeEvent] = []
        self._cv = threading.Condition()
        self.stream: EventStream | None = None

    def emit(self, events: list[DecodeEvent | None]) -> None:
        events = [ev for ev in events if ev is not None]
        if events:
            with self._cv:
                self._events.extend(events)  # type: ignore[arg-type]
                self._cv.notify_all()

    def poll(self, timeout_s: float) -> list[DecodeEvent]:
        """The events since the last call, waiting up to timeout_s for one."""
        with self._cv:
            if not self._events:
                self._cv.wait(timeout_s)
            events, self._events = self._events, []
        return events

    def put_back(self, events: list[DecodeEvent]) -> None:
        """Events that did not reach the router go first next time, in their order."""
        with self._cv:
            self._events[:0] = events
            self._cv.notify_all()

    def open_stream(self) -> tuple[str, int, str]:
        """Step 1: (host, port, secret), listening from the first call on."""
        with self._cv:
            if self.stream is None:
                self.stream = EventStream(self.poll, self.put_back)
            return self.stream.host, self.stream.port, self.stream.secret

    @property
    def frames_sent(self) -> int:
        return 0 if self.stream is None else self.stream.frames_sent

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


class EventStream:
    """Worker side (steps 1-4): `take(timeout_s)` returns the events emitted since it was last
    called (waiting up to timeout_s); `put_back(events)` returns unsent ones to the front."""

    def __init__(self, take: Callable[[float], list[DecodeEvent]], put_back: Callable[[list[DecodeEvent]], None],
                 host: str | None = None) -> None:
        self.take, self.put_back = take, put_back
        self.secret = secrets.token_hex(16)
        self.host = host or node_address()
        self._sock = socket.create_server((self.host, 0))
        self.port = int(self._sock.getsockname()[1])
        self._closed = False
        self.frames_sent = 0
        self._conn: socket.socket | None = None  # the router's connection being served
        threading.Thread(target=self._serve, name="event-stream", daemon=True).start()

    def close(self) -> None:
        """Stop listening and end the router's connection (it then asks Ray whether this worker lives)."""
        self._closed = True
        self._sock.close()
        conn = self._conn
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                if self._admit(conn):
                    self._conn = conn
                    try:
                        self._send(conn)
                    finally:
                        self._conn = None

    def _admit(self, conn: socket.socket) -> bool:
        """2. The secret, on a line of its own, within 10 s."""
        conn.settimeout(10)
        want, got = self.secret.encode() + b"\n", b""
        try:
            while len(got) < len(want) and not got.endswith(b"\n"):
                part = conn.recv(len(want) - len(got))
                if not part:
                    return False
                got += part
        except OSError:
            return False
        ok = hmac.compare_digest(got, want)
        if not ok:
            log.warning("event stream: a connection without the secret was closed")
        return ok

    def _send(self, conn: socket.socket) -> None:
        """3-4. Until the router goes; a frame written just before the peer vanished is lost with it
        (the kernel took it): the router reconnects only when the connection failed on its side too."""
        conn.settimeout(SEND_TIMEOUT_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while not self._closed:
            events = self.take(HEARTBEAT_S)
            try:
                if _peer_closed(conn):  # the router hung up: these wait for its next connection
                    raise ConnectionResetError("the router closed the connection")
                conn.sendall(encode(events))
                self.frames_sent += 1
            except OSError as e:
                if events:
                    self.put_back(events)
                log.info("event stream: the router's connection ended (%s)", e)
                return


def _peer_closed(conn: socket.socket) -> bool:
    """The router closed its end (an orderly FIN waits to be read): sending now would lose the frame."""
    readable, _, _ = select.select([conn], [], [], 0)
    if not readable:
        return False  # open, nothing to read: the usual case
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True  # reset
