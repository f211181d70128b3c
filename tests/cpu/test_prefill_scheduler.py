"""Prefill admission and chunking, without a model."""
from __future__ import annotations

from engine.block_allocator import BlockAllocator
from engine.types import PrefillRequest, SamplingParams
from engine.prefill_scheduler import MAX_DEFER, PendingPrefill, PrefillScheduler


def _p(rid: str, n: int) -> PendingPrefill:
    return PendingPrefill(PrefillRequest(rid, list(range(n)), SamplingParams(), (2,), 1))


def _admit(alloc: BlockAllocator):  # type: ignore[no-untyped-def]
    return lambda p: alloc.allocate(p.request.request_id, p.num_tokens) is not None


def _drain(s: PrefillScheduler, alloc: BlockAllocator) -> list[list[tuple[str, int, int]]]:
    steps = []
    while s.has_work():
        chunks = s.next_step(_admit(alloc))
        steps.append([(c.pending.request.request_id, c.start, c.length) for c in chunks])
        for p in s.advance(chunks):
            alloc.free(p.request.request_id)
    return steps


def test_short_prompt_goes_first_and_the_long_one_in_chunks() -> None:
    alloc = BlockAllocator(64, 16)
    s = PrefillScheduler(max_batch_tokens=100, chunk_tokens=64)
    s.add(_p("long", 200))
    s.add(_p("short", 10))
    steps = _drain(s, alloc)
    assert steps[0] == [("short", 0, 10)]  # finishes alone, not slowed by the long prompt's chunk
    assert steps[1:] == [[("long", 0, 64)], [("long", 64, 64)], [("long", 128, 64)], [("long", 192, 8)]]
    alloc.check()
    assert alloc.num_used == 0


def test_long_prompts_are_served_one_after_another() -> None:
    alloc = BlockAllocator(64, 16)
    s = PrefillScheduler(max_batch_tokens=200, chunk_tokens=64)
    s.add(_p("doc1", 150))
    s.add(_p("doc2", 150))
    steps = _drain(s, alloc)
    order = [rid for step in steps for rid, _, _ in step]
    assert order == ["doc1"] * 3 + ["doc2"] * 3  # doc1's first token does not wait for doc2's chunks
    alloc.check()


def test_a_stream_of_short_prompts_does_not_starve_a_long_one() -> None:
    alloc = BlockAllocator(64, 16)
    s = PrefillScheduler(max_batch_tokens=100, chunk_tokens=32)
    s.add(_p("long", 96))  # 3 chunks
    long_steps = []
    for i in range(3 * (MAX_DEFER + 1)):
        s.add(_p(f"s{i}", 4))  # a new short prompt before every step
        chunks = s.next_step(_admit(alloc))
        if any(c.pending.request.request_id == "long" for c in chunks):
            long_steps.append(i)
        for p in s.advance(chunks):
            alloc.free(p.request.request_id)
    # passed over MAX_DEFER times, then it shares a step; its last chunk finishes, so it goes at once
    assert long_steps == [MAX_DEFER, 2 * MAX_DEFER + 1, 2 * MAX_DEFER + 2]
    alloc.check()


def test_budget_packs_many_prompts_shortest_first_under_scratch() -> None:
    alloc = BlockAllocator(4, 16)  # 64 tokens of scratch
    s = PrefillScheduler(max_batch_tokens=1000, chunk_tokens=1000)
    for rid, n in (("a", 20), ("b", 30), ("c", 40), ("d", 5)):
        s.add(_p(rid, n))
    chunks = s.next_step(_admit(alloc))
    assert [c.pending.request.request_id for c in chunks] == ["d", "a"]  # 1 + 2 blocks; b, c do not fit
    done = s.advance(chunks)
    assert [p.request.request_id for p in done] == ["d", "a"]
    for p in done:
        alloc.free(p.request.request_id)
    chunks = s.next_step(_admit(alloc))
    assert [c.pending.request.request_id for c in chunks] == ["b"]  # c (3 blocks) waits for b's
    for p in s.advance(chunks):
        alloc.free(p.request.request_id)
    assert [c.pending.request.request_id for c in s.next_step(_admit(alloc))] == ["c"]


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


def test_a_more_urgent_prompt_goes_first_and_less_urgent_ones_get_what_it_leaves() -> None:
    """priority (lower first): the urgent document's chunk takes the step before shorter prompts of
    priority 1 (without priorities they would finish first and its chunk would wait); those share
    what it leaves, shortest first as at one priority."""
    alloc = BlockAllocator(64, 16)
    s = PrefillScheduler(max_batch_tokens=100, chunk_tokens=64)

    def p(rid: str, n: int, priority: int) -> PendingPrefill:
        return PendingPrefill(PrefillRequest(rid, list(range(n)), SamplingParams(priority=priority), (2,), 1))

    for rid in ("s1", "s2", "s3"):
        s.add(p(rid, 30, 1))
    s.add(p("doc", 150, -1))
    steps = _drain(s, alloc)
    assert steps[0] == [("doc", 0, 64), ("s1", 0, 30)]  # 36 left: one short prompt fits
    assert steps[1] == [("doc", 64, 64), ("s2", 0, 30)]
    assert steps[2] == [("doc", 128, 22), ("s3", 0, 30)]
    alloc.check()
