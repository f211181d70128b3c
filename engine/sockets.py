"""What the worker's sockets (engine/event_stream.py, engine/kv_handoff/control.py) share."""
from __future__ import annotations

import socket


def shut_down(sock: socket.socket) -> None:
    """End both directions of `sock` now: a thread blocked in its accept() or recv() returns (on
    Linux, close() alone leaves it blocked). One already shut or gone is left alone."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
