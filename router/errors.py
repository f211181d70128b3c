"""How a request's trip through the workers can fail; the fronts map each to a status."""
from __future__ import annotations


class ResourceExhausted(RuntimeError):
    """No room for it (KV, the admission queue, the in-flight limit)."""


class WorkerFailure(RuntimeError):
    """A worker failed it, is gone, or the router is draining."""


class DeadlineExceeded(RuntimeError):
    """Its deadline passed while it waited."""


class AlreadyExists(RuntimeError):
    """Its request id is in flight already."""
