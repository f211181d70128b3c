"""Prefill admission and chunking, without a model."""
from __future__ import annotations

from engine.block_allocator import BlockAllocator
from engine.types import PrefillRequest, SamplingParams
from engine.prefill_scheduler import PendingPrefill, PrefillScheduler


def _p(rid: str, n: int) -> PendingPrefill:
    return PendingPrefill(PrefillRequest(rid, list(range(n)), SamplingParams(), (2,), 1))


def _admit(alloc: BlockAllocator):  # type: ignore[no-untyped-def]
    return lambda p: alloc.allocate(p.request.request_id, p.num_tokens) is not None


def test_long_prompt_is_chunked_and_short_ones_share_its_steps() -> None:
    alloc = BlockAllocator(64, 16)
    s = PrefillScheduler(max_batch_tokens=100, chunk_tokens=64)
    s.add(_p("long", 200))
    s.add(_p("short", 10))
    steps = []
    while s.has_work():
        chunks = s.next_step(_admit(alloc))
        steps.append([(c.pending.request.request_id, c.start, c.length) for c in chunks])
        for p in s.advance(chunks):
            alloc.free(p.request.request_id)
    assert steps[0] == [("long", 0, 64), ("short", 0, 10)]  # the short prompt does not wait
    assert steps[1:] == [[("long", 64, 64)], [("long", 128, 64)], [("long", 192, 8)]]
    alloc.check()
    assert alloc.num_used == 0


def test_budget_packs_many_prompts_and_waits_fcfs_for_scratch() -> None:
    alloc = BlockAllocator(4, 16)  # 64 tokens of scratch
    s = PrefillScheduler(max_batch_tokens=1000, chunk_tokens=1000)
    for rid, n in (("a", 20), ("b", 30), ("c", 40), ("d", 5)):
        s.add(_p(rid, n))
    chunks = s.next_step(_admit(alloc))
    assert [c.pending.request.request_id for c in chunks] == ["a", "b"]  # c does not fit; d may not overtake
    done = s.advance(chunks)
    assert [p.request.request_id for p in done] == ["a", "b"]
    for p in done:
        alloc.free(p.request.request_id)
    chunks = s.next_step(_admit(alloc))
    assert [c.pending.request.request_id for c in chunks] == ["c", "d"]


def test_cancel_mid_chunks_frees_scratch() -> None:
    alloc = BlockAllocator(64, 16)
    s = PrefillScheduler(max_batch_tokens=32, chunk_tokens=32)
    p = _p("x", 100)
    s.add(p)
    s.advance(s.next_step(_admit(alloc)))
    assert p.computed == 32 and alloc.num_used == 7
    p.cancelled = True
    for gone in s.drop_cancelled():
        alloc.free(gone.request.request_id)
    assert not s.has_work() and alloc.num_used == 0
    alloc.check()
