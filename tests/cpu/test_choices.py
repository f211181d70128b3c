"""router/choices.py: one OpenAI request's choices as requests of their own, their streams merged."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from engine.types import SamplingParams
from router.choices import fan_out, merged
from router.service import Refused
from router.validation import ValidRequest


def test_each_choice_is_a_request_of_its_own_with_the_next_seed() -> None:
    req = ValidRequest("k0", [1, 2], SamplingParams(max_tokens=4, temperature=0.8, seed=2**64 - 2), ("x",), "k0")
    kids = fan_out(req, 3)
    assert kids[0] is req
    assert len({k.key for k in kids}) == 3 and all(k.request_id == k.key for k in kids)  # unlabelled: key is label
    assert [k.sampling.seed for k in kids] == [2**64 - 2, 2**64 - 1, 0]
    assert all(k.prompt_ids == [1, 2] and k.stop == ("x",) and k.sampling.temperature == 0.8 for k in kids)
    labelled = fan_out(ValidRequest("mine", [1], SamplingParams(max_tokens=1), (), "k1"), 2)
    assert [k.request_id for k in labelled] == ["mine", "mine.1"]
    assert fan_out(ValidRequest("u", [1], SamplingParams(max_tokens=1), (), "u"), 2)[1].sampling.seed is None


class Stream:
    """An async generator's stand-in that records whether it was closed before its end."""

    def __init__(self, items: list[object], gap_s: float = 0.0, fail: Exception | None = None) -> None:
        self.items, self.gap_s, self.fail, self.closed, self.ended = items, gap_s, fail, False, False

    async def run(self) -> AsyncIterator[object]:
        try:
            for x in self.items:
                await asyncio.sleep(self.gap_s)
                yield x
            if self.fail is not None:
                raise self.fail
            self.ended = True
        finally:
            self.closed = not self.ended


def test_messages_come_tagged_each_stream_in_its_order() -> None:
    async def main() -> list[tuple[int, object]]:
        streams = [Stream(["a1", "a2", "a3"], 0.003), Stream(["b1", "b2"], 0.005), Stream(["c1"], 0.0)]
        return [x async for x in merged([s.run() for s in streams])]

    got = asyncio.run(main())
    assert sorted(got) == [(0, "a1"), (0, "a2"), (0, "a3"), (1, "b1"), (1, "b2"), (2, "c1")]
    for i in range(3):
        mine = [m for j, m in got if j == i]
        assert mine == sorted(mine)


def test_an_error_in_one_choice_ends_the_others() -> None:
    async def main() -> tuple[Stream, Stream]:
        slow = Stream([f"s{i}" for i in range(100)], 0.01)
        bad = Stream(["x"], 0.02, fail=Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV cache full"))
        with pytest.raises(Refused, match="KV cache full"):
            async for _ in merged([slow.run(), bad.run()]):
                pass
        return slow, bad

    slow, bad = asyncio.run(main())
    assert slow.closed  # closed early: its request is cancelled on the workers


def test_a_client_that_goes_away_closes_every_choice() -> None:
    async def main() -> list[Stream]:
        streams = [Stream([f"{i}.{k}" for k in range(100)], 0.005) for i in range(3)]
        gen = merged([s.run() for s in streams])
        for _ in range(5):
            await anext(gen)
        await gen.aclose()
        return streams

    assert all(s.closed for s in asyncio.run(main()))
