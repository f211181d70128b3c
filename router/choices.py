"""One OpenAI request, several choices: `n`, and a /v1/completions batch of prompts, fan out into
requests of their own (each with its own KV, limits and metrics, as vLLM's parallel sampling does),
and their streams merge here, each message tagged with its choice's index.

Choice i of a prompt given a `seed` draws as a request with seed + i would (mod 2^64): the choices
differ, and each can be reproduced alone.
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Any, TypeVar

from router.validation import ValidRequest

M = TypeVar("M")
_END = object()


def fan_out(req: ValidRequest, n: int) -> list[ValidRequest]:
    """`n` requests for one prompt: the first is `req`, the others get a key (and a label) of their
    own and, if seeded, the next seeds."""
    out = [req]
    for i in range(1, n):
        key = uuid.uuid4().hex
        label = key if req.request_id == req.key else f"{req.request_id}.{i}"
        seed = req.sampling.seed
        sampling = req.sampling if seed is None else replace(req.sampling, seed=(seed + i) % 2**64)
        out.append(replace(req, request_id=label, key=key, sampling=sampling))
    return out


async def merged(streams: list[AsyncIterator[M]]) -> AsyncIterator[tuple[int, M]]:
    """(index, message) from every stream as they come, each stream's in its own order. An error from
    any stream is raised here and ends them all; closing this closes every stream (which cancels its
    request on the workers)."""
    if len(streams) == 1:  # the common case, without a task in between
        async with aclosing(streams[0]) as msgs:  # type: ignore[type-var]
            async for m in msgs:
                yield 0, m
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(maxsize=len(streams))  # back-pressure per stream

    async def pump(i: int, stream: AsyncIterator[M]) -> None:
        try:
            async with aclosing(stream) as msgs:  # type: ignore[type-var]
                async for m in msgs:
                    await queue.put((i, m))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 — Refused, or a bug: the consumer raises it
            await queue.put((i, e))
            return
        await queue.put((i, _END))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, m = await queue.get()
            if m is _END:
                left -= 1
            elif isinstance(m, Exception):
                raise m
            else:
                yield i, m
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
