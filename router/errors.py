"""How a request can fail — its fields, or its trip through the workers; the fronts map each to a status."""
from __future__ import annotations


class InvalidArgument(ValueError):
    """A field of the request is bad: `field` names it (`stop[2]`, `messages[1].role`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class BadRequest(ValueError):
    """An HTTP body the OpenAI front refuses: HTTP `status`, `param` names the field (OpenAI's error object)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


class ResourceExhausted(RuntimeError):
    """No room for it (KV, the admission queue, the in-flight limit)."""


class WorkerFailure(RuntimeError):
    """A worker failed it, is gone, or the router is draining."""


class DeadlineExceeded(RuntimeError):
    """Its deadline passed while it waited."""


class AlreadyExists(RuntimeError):
    """Its request id is in flight already."""
