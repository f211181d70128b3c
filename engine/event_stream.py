"""A decode (or aggregated) worker's events, pushed to the router over one TCP connection.

A Ray actor call per step (the router's long poll) cost, with 64 events, ~0.25 ms of the router's
event loop, ~0.3 ms of its Ray I/O thread and ~0.45 ms of the worker's Python threads — GIL time
taken from its step loop — and 1.2 ms from call to answer; this stream costs ~0.05 ms on each side
and 0.07 ms (`python bench/ray_poll.py`). A worker at a GPU's pace emits a batch every few ms.
So, as vLLM and SGLang do between their engine and API processes, the events go over a plain
socket, the way in set up through Ray.

The events form a log of numbered frames (EventOutbox): a frame is numbered when it is taken to be
sent and kept until the router acknowledges it, so a frame lost with a connection, or with a Ray
answer that never arrived, is sent again, and the router delivers each number once:

  1. the router calls `open_event_stream()` on the worker (a Ray call): the worker starts listening
     on its node's address, once, and answers (host, port, secret, log)
  2. the router connects and sends the secret with the last frame it delivered of that log; the
     worker checks the secret (a connection without it is closed); one router connection at a time:
     a newer one is taken when the older one ended
  3. the worker's sender thread first sends again every frame after the router's last, then, as its
     steps emit events, one frame at a time (4-byte length, 8-byte number, then JSON: never pickle,
     the router must not run what a socket sends it); with nothing to send it writes an empty frame
     (the last number) every `HEARTBEAT_S`, so either side finds a dead peer
  4. the router delivers a frame whose number is past its last, and acknowledges (8-byte number)
     every `ACK_EVERY` frames and on a heartbeat; the worker then forgets the frames up to it
  5. the router reads frames until the connection ends, then asks the worker through Ray whether it
     is alive: gone → its requests fail or move (router/liveness.py); alive → again from 1, and
     after three tries that brought no frame it long-polls the worker through Ray instead:
     `poll(timeout, log, acked)` acknowledges as step 4 and answers every frame after `acked`
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
from collections import deque
from dataclasses import dataclass

from engine.sockets import shut_down
from engine.types import DecodeEvent, FinishReason, TokenLogprob

log = logging.getLogger(__name__)
HEARTBEAT_S = 0.25  # an idle connection carries an empty frame this often
SEND_TIMEOUT_S = 30.0  # a frame the router does not take within this: the connection is dropped
ACK_EVERY = 32  # the router acknowledges at least every this many frames (and on each heartbeat)
HEADER = struct.Struct(">IQ")  # a frame: body length, frame number
ACK = struct.Struct(">Q")  # the router's acknowledgement: the last frame number it delivered


def encode(seq: int, events: list[DecodeEvent]) -> bytes:
    """One frame: header, then the events as JSON arrays."""
    body = json.dumps([
        [e.request_id, e.token_ids, e.finish_reason.value if e.finish_reason is not None else None, e.error,
         e.kv_transfer_ms, e.kv_bytes,
         None if e.logprobs is None else [[lp.token_id, lp.logprob, lp.top] for lp in e.logprobs]]
        for e in events
    ], separators=(",", ":")).encode()
    return HEADER.pack(len(body), seq) + body


def decode(body: bytes) -> list[DecodeEvent]:
    """A frame's body (after its header) → events."""
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


@dataclass(frozen=True)
class EventBatch:
    """One poll's answer: the events of every frame after the router's last, in order; `seq` is the
    number of the last of them in `log`."""

    log: str
    seq: int
    events: list[DecodeEvent]


class EventOutbox:
    """A worker's events on their way to the router, as a log of numbered frames. Its step loop
    emits events; a frame is numbered when it is taken (by the stream's sender or by `poll()`) and
    kept until the router acknowledges it. `log` names this log: a restarted worker starts another."""

    def __init__(self) -> None:
        self.log = secrets.token_hex(8)
        self.secret = secrets.token_hex(16)  # what a connection to this worker's event stream must send
        self._pending: list[DecodeEvent] = []  # emitted, not yet in a frame
        self._unacked: deque[tuple[int, list[DecodeEvent]]] = deque()  # (number, events), oldest first
        self._seq = 0  # the last frame's number
        self._cv = threading.Condition()
        self.stream: EventStream | None = None

    def emit(self, events: list[DecodeEvent | None]) -> None:
        events = [ev for ev in events if ev is not None]
        if events:
            with self._cv:
                self._pending.extend(events)  # type: ignore[arg-type]
                self._cv.notify_all()

    def take(self, timeout_s: float) -> tuple[int, list[DecodeEvent]]:
        """The next frame: the events emitted since the last one, numbered and kept until
        acknowledged; (the last number, []) when none came within timeout_s."""
        with self._cv:
            if not self._pending:
                self._cv.wait(timeout_s)
            if not self._pending:
                return self._seq, []
            return self._frame_pending()

    def ack(self, log_: str, seq: int) -> None:
        """The router delivered the frames of `log_` up to `seq`: they are forgotten."""
        with self._cv:
            if log_ == self.log:
                while self._unacked and self._unacked[0][0] <= seq:
                    self._unacked.popleft()

    def unacked(self) -> list[tuple[int, list[DecodeEvent]]]:
        with self._cv:
            return list(self._unacked)

    def poll(self, timeout_s: float, log_: str = "", acked: int = 0) -> EventBatch:
        """The router's long poll through Ray: acknowledges `acked` of `log_`, then answers every
        frame after it (one whose answer was lost, then the events since), waiting up to timeout_s
        for one when none is owed."""
        self.ack(log_, acked)
        with self._cv:
            if not self._unacked and not self._pending:
                self._cv.wait(timeout_s)
            if self._pending:
                self._frame_pending()
            return EventBatch(self.log, self._seq, [ev for _, events in self._unacked for ev in events])

    def _frame_pending(self) -> tuple[int, list[DecodeEvent]]:
        self._seq += 1
        frame = (self._seq, self._pending)
        self._pending = []
        self._unacked.append(frame)
        return frame

    def open_stream(self) -> tuple[str, int, str, str]:
        """Step 1: (host, port, secret, log), listening from the first call on."""
        with self._cv:
            if self.stream is None:
                self.stream = EventStream(self)
            return self.stream.host, self.stream.port, self.secret, self.log

    @property
    def frames_sent(self) -> int:
        return 0 if self.stream is None else self.stream.frames_sent

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


class EventStream:
    """Worker side of steps 1-4: sends the outbox's frames to one router connection at a time."""

    def __init__(self, outbox: EventOutbox, host: str | None = None) -> None:
        self.outbox = outbox
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
        shut_down(self._sock)  # wakes the accept() in progress (close alone does not)
        self._sock.close()
        conn = self._conn
        if conn is not None:
            shut_down(conn)

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                acked = self._admit(conn)
                if acked is not None:
                    self._conn = conn
                    try:
                        self._send(conn, *acked)
                    except OSError as e:  # the frames not acknowledged wait for the next connection
                        log.info("event stream: the router's connection ended (%s)", e)
                    finally:
                        self._conn = None

    def _admit(self, conn: socket.socket) -> tuple[str, int] | None:
        """2. "secret log acked" on a line of its own, within 10 s → (log, acked); None: closed."""
        conn.settimeout(10)
        got = b""
        try:
            while not got.endswith(b"\n") and len(got) < 256:
                part = conn.recv(256 - len(got))
                if not part:
                    return None
                got += part
            secret, log_, acked = got.decode().split()
            if hmac.compare_digest(secret.encode(), self.outbox.secret.encode()):
                return log_, int(acked)
        except (OSError, ValueError, UnicodeDecodeError):
            pass
        log.warning("event stream: a connection without the secret was closed")
        return None

    def _send(self, conn: socket.socket, log_: str, acked: int) -> None:
        """3-4. Until the router goes."""
        conn.settimeout(SEND_TIMEOUT_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.outbox.ack(log_, acked)
        for seq, events in self.outbox.unacked():  # 3. owed: lost with an earlier connection
            conn.sendall(encode(seq, events))
        acks = _Acks(conn)
        while not self._closed:
            seq, events = self.outbox.take(HEARTBEAT_S)
            last = acks.read()  # raises when the router hung up: the frame waits for its next connection
            if last is not None:
                self.outbox.ack(self.outbox.log, last)
            conn.sendall(encode(seq, events))
            self.frames_sent += 1


class _Acks:
    """4. The router's acknowledgements, read without blocking before each frame is written."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn, self.buf = conn, b""

    def read(self) -> int | None:
        """The last number the router acknowledged since the previous call (None: none)."""
        last = None
        while select.select([self.conn], [], [], 0)[0]:
            part = self.conn.recv(4096)
            if not part:
                raise ConnectionResetError("the router closed the connection")
            self.buf += part
            n = len(self.buf) // ACK.size * ACK.size
            if n:
                last = ACK.unpack_from(self.buf, n - ACK.size)[0]
                self.buf = self.buf[n:]
        return last
