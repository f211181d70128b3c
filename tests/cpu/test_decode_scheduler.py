"""Decode scheduler lifecycles with fake token outputs (no model): each ends empty with no leak."""
from __future__ import annotations

from decode_worker.request import DecodeStatus
from decode_worker.scheduler import DecodeScheduler
from engine.prefix_cache import PrefixCache
from engine.types import FinishReason, SamplingParams

EOS = 2


def _sched(blocks: int = 32, batch: int = 4) -> DecodeScheduler:
    return DecodeScheduler(PrefixCache(blocks, 4), batch, reserve_timeout_s=10)


def _arrive(s: DecodeScheduler, rid: str, first: int = 7, seq: int = 0) -> None:
    assert s.start_write(rid, s.requests[rid].num_prompt_tokens) is not None
    assert s.on_kv_landed(rid, first) is not None


def _empty(s: DecodeScheduler) -> None:
    s.allocator.check()
    assert s.is_idle() and s.allocator.num_used == 0


def test_join_run_finish_by_length_and_eos() -> None:
    s = _sched()
    assert s.reserve("a", 5, SamplingParams(max_tokens=3), (EOS,)).ok
    assert s.reserve("b", 5, SamplingParams(max_tokens=10), (EOS,)).ok
    _arrive(s, "a")
    batch = s.schedule()
    assert [r.request_id for r in batch] == ["a"]
    ev = s.on_tokens(batch, [8])
    assert ev[0].finish_reason is None
    _arrive(s, "b", seq=1)  # joins the running batch mid-flight
    batch = s.schedule()
    assert [r.request_id for r in batch] == ["a", "b"]
    ev = s.on_tokens(batch, [9, EOS])
    assert [e.finish_reason for e in ev] == [FinishReason.LENGTH, FinishReason.STOP]
    assert s.schedule() == []
    _empty(s)


def test_ignore_eos_and_stop_token_ids() -> None:
    s = _sched()
    s.reserve("a", 5, SamplingParams(max_tokens=5, ignore_eos=True, stop_token_ids=(42,)), (EOS,))
    _arrive(s, "a")
    assert s.on_tokens(s.schedule(), [EOS])[0].finish_reason is None
    assert s.on_tokens(s.schedule(), [42])[0].finish_reason is FinishReason.STOP
    _empty(s)


def test_cancel_in_every_state_frees_blocks() -> None:
    s = _sched()
    for rid in ("reserved", "writing", "ready", "running"):
        assert s.reserve(rid, 5, SamplingParams(max_tokens=8), (EOS,)).ok
    s.start_write("writing", 5)
    _arrive(s, "running", seq=1)
    s.schedule()
    _arrive(s, "ready", seq=2)
    assert s.requests["ready"].status is DecodeStatus.READY
    assert s.requests["running"].status is DecodeStatus.RUNNING
    batch = s.schedule()
    for rid in ("reserved", "writing", "ready", "running"):
        assert s.cancel(rid)
    assert s.on_tokens(batch, [1] * len(batch)) == []  # tokens of cancelled requests are dropped
    assert not s.cancel("running")  # second cancel is a no-op
    assert s.write_failed("writing", "aborted") is None  # the write ended: now its blocks come back
    _empty(s)


def test_cancel_while_writing_keeps_the_blocks_until_the_write_ends() -> None:
    s = _sched(blocks=8)  # 32 tokens: one 13-token request fills 4 blocks
    assert s.reserve("w", 5, SamplingParams(max_tokens=8), (EOS,)).ok
    held = list(s.requests["w"].block_table)
    assert s.start_write("w", 5) is not None
    assert s.cancel("w")
    assert s.allocator.num_used == len(held)  # a writer may still be copying into them
    assert s.reserve("x", 5, SamplingParams(max_tokens=8), (EOS,)).ok
    assert not set(s.requests["x"].block_table) & set(held)  # nobody else gets them meanwhile
    assert s.on_kv_landed("w", 7) is None  # landed after the cancel: ends quietly, blocks back
    assert s.allocator.num_used == len(s.requests["x"].block_table)
    s.cancel("x")
    _empty(s)


def test_write_must_match_the_reserved_prompt() -> None:
    s = _sched()
    s.reserve("a", 5, SamplingParams(max_tokens=8), (EOS,))
    assert s.start_write("a", 6) is None  # a writer with another prompt length is refused
    assert s.start_write("a", 5) is not None
    assert s.start_write("a", 5) is None  # granted once
    ev = s.write_failed("a", "lost")
    assert ev is not None and ev.finish_reason is FinishReason.ERROR
    _empty(s)


def test_kv_arriving_after_cancel_is_ignored() -> None:
    s = _sched()
    s.reserve("a", 5, SamplingParams(max_tokens=8), (EOS,))
    s.cancel("a")
    assert s.start_write("a", 5) is None
    assert s.on_kv_landed("a", 7) is None
    _empty(s)


def test_reservation_refused_when_full_and_expired_when_abandoned() -> None:
    s = _sched(blocks=4)  # 16 tokens
    assert s.reserve("a", 5, SamplingParams(max_tokens=8), (EOS,)).ok
    r = s.reserve("b", 5, SamplingParams(max_tokens=8), (EOS,))
    assert not r.ok and "KV cache full" in r.reason
    assert not s.reserve("a", 1, SamplingParams(max_tokens=1), (EOS,)).ok  # duplicate id
    ev = s.expire(now=s.requests["a"].created + 11)
    assert [e.finish_reason for e in ev] == [FinishReason.ERROR]
    _empty(s)


def test_batch_is_capped_and_ready_requests_queue() -> None:
    s = _sched(blocks=64, batch=2)
    for i in range(4):
        s.reserve(f"r{i}", 2, SamplingParams(max_tokens=2), (EOS,))
        _arrive(s, f"r{i}", seq=i)
    batch = s.schedule()
    assert [r.request_id for r in batch] == ["r0", "r1"]
    s.on_tokens(batch, [5, 5])  # both finish (max_tokens=2 with the first token)
    batch = s.schedule()
    assert [r.request_id for r in batch] == ["r2", "r3"]
    s.on_tokens(batch, [5, 5])
    _empty(s)


def test_a_reservation_holds_the_cached_prefix_of_its_prompt_which_is_never_written_or_recomputed() -> None:
    """share_on_reserve (a decode worker): the prompt's whole blocks are findable once its KV has
    landed; a later reservation with the same prefix holds those blocks (the destination says how
    many: the prefill writes after them) and a failed write recomputes after them too."""
    s = DecodeScheduler(PrefixCache(32, 4), 8, reserve_timeout_s=10, on_demand=True, share_on_reserve=True)
    sp = SamplingParams(max_tokens=8)
    prompt = list(range(10, 23))  # 13 tokens: 3 whole blocks, a 4th with its last token
    first = s.reserve("a", 13, sp, (2,), prompt)
    assert first.dest is not None and first.dest.shared_blocks == 0
    assert s.reserve("early", 13, sp, (2,), prompt).dest.shared_blocks == 0  # a's KV has not landed yet
    s.start_write("a", 13)
    s.on_kv_landed("a", 5)
    second = s.reserve("b", 13, sp, (2,), prompt[:12] + [99])
    assert second.dest is not None and second.dest.shared_blocks == 3
    assert second.dest.block_ids[:3] == first.dest.block_ids[:3] and second.dest.block_ids[3] != first.dest.block_ids[3]
    assert s.reserve("other", 13, sp, (2,), prompt, cache_salt="t2").dest.shared_blocks == 0  # another salt
    s.start_write("b", 13)
    b = s.recompute_write("b", 6)  # its write failed: computed here, after the shared blocks
    assert b is not None and b.recomputed == 12 and [(c.start, c.length) for c in s.recompute_chunks(100)] == [(12, 1)]
    for rid in ("a", "early", "b", "other"):
        s.cancel(rid)
    s.allocator.check()
    assert s.is_idle() and s.allocator.num_used == 0
