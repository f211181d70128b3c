"""KV on demand (kv_cache.allocation: on_demand): a decode worker holds a request's prompt blocks,
adds one as its output grows, and when none is free preempts the newest request and later
recomputes its KV. The scheduler alone (no model), then decode and aggregated workers on the tiny
model: through preemptions the tokens are HF generate's, seeded draws are the ones drawn alone."""
from __future__ import annotations

import concurrent.futures as cf
import random
import time

import pytest

from decode_worker.aggregated import AggregatedWorker
from decode_worker.config import AggregatedConfig, DecodeConfig
from decode_worker.request import DecodeStatus
from decode_worker.scheduler import DecodeScheduler
from decode_worker.worker import DecodeWorker
from engine.prefix_cache import PrefixCache, block_digests
from engine.config import KVCacheConfig, ModelConfig, TransportConfig
from engine.kv_handoff import FakeHub
from engine.tiny import tiny_tokenizer
from engine.types import FinishReason, PrefillRequest, SamplingParams
from prefill_worker.config import PrefillConfig
from prefill_worker.worker import PrefillWorker
from tests.cpu.harness import hf_greedy, prompts
from tests.cpu.test_workers_inprocess import EOS, Events, _idle, wire

BS = 4  # tokens per block in the scheduler tests


def _sched(blocks: int, batch: int = 8, watermark: float = 0.0, prefix_cache: bool = True) -> DecodeScheduler:
    return DecodeScheduler(PrefixCache(blocks, BS, prefix_cache), batch, 10, on_demand=True, watermark=watermark)


def _arrive(s: DecodeScheduler, rid: str, n_prompt: int, max_tokens: int, first: int = 7) -> None:
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    assert s.reserve(rid, n_prompt, sp, EOS, list(range(10, 10 + n_prompt))).ok
    assert s.start_write(rid, n_prompt) is not None
    assert s.on_kv_landed(rid, first) is not None


def _step(s: DecodeScheduler, tok: int = 5) -> list[str]:
    """One decode step with every row sampling `tok`; recomputes done at once. The ids that ran."""
    s.resume()
    chunks = s.recompute_chunks(10_000)
    batch = s.schedule()
    for r in batch:  # the invariants the model runner relies on: a slot for the token it feeds, in a block
        assert len(r.block_table) * BS >= r.num_tokens, r.request_id  # nobody else reads or finds
        assert s.allocator.writable(r.block_table[(r.num_tokens - 1) // BS]), r.request_id
    for c in chunks:  # a recompute writes only blocks of its own
        assert all(s.allocator.writable(c.request.block_table[p // BS]) for p in range(c.start, c.start + c.length))
    s.on_tokens(batch, [tok] * len(batch))
    s.on_recomputed(chunks)
    s.allocator.check()
    return [r.request_id for r in batch]


def test_on_demand_holds_the_prompt_and_grows_a_block_at_a_time() -> None:
    s = _sched(32)
    _arrive(s, "a", 5, 20)  # 5 prompt tokens: 2 blocks, not ceil(25 / 4) = 7
    assert len(s.requests["a"].block_table) == 2
    sizes = []
    for _ in range(9):
        _step(s)
        sizes.append(len(s.requests["a"].block_table))
    # step k feeds position 4 + k (the first token at 5): a block more when it reaches 8, then 12
    assert sizes == [2, 2, 2, 3, 3, 3, 3, 4, 4]
    upfront = DecodeScheduler(PrefixCache(32, BS), 8, 10)
    assert upfront.reserve("a", 5, SamplingParams(max_tokens=20), EOS, list(range(5))).dest.block_ids == tuple(range(7))


def test_the_newest_is_preempted_resumed_when_room_returns_and_goes_on_where_it_stopped() -> None:
    s = _sched(6)  # 24 tokens
    _arrive(s, "old", 4, 12)  # 1 block each to start
    _arrive(s, "new", 4, 12)
    held_before = None
    while s.requests["new"].status is not DecodeStatus.PREEMPTED:
        held_before = list(s.requests["new"].output_ids)
        _step(s)
    new = s.requests["new"]
    assert s.preemptions == 1 and new.block_table == [] and "new" not in s.running
    assert len(new.output_ids) == len(held_before)  # what it had sampled is kept
    assert s.requests["old"].status is DecodeStatus.RUNNING  # the older one is never the victim
    refused = s.reserve("later", 1, SamplingParams(max_tokens=1), EOS, [1])
    assert not refused.ok and "preempted requests wait" in refused.reason  # it resumes before anyone new
    while "old" in s.requests:
        assert "new" not in _step(s)
    assert _step(s) == []  # this step resumes it and recomputes its KV; it decodes from the next
    assert new.status is DecodeStatus.READY and len(new.block_table) * BS >= new.num_tokens
    while "new" in s.requests:
        _step(s)
    assert len(new.output_ids) == 12 and new.finish_reason is FinishReason.LENGTH
    assert s.is_idle() and s.allocator.num_used == 0


def test_recompute_covers_prompt_and_output_but_the_last_token_in_chunks() -> None:
    s = _sched(10, prefix_cache=False)  # (with it, what is still cached is not recomputed: below)
    _arrive(s, "a", 6, 30)
    _arrive(s, "b", 6, 30)
    while not s.preempted:
        _step(s, tok=40 + len(s.running))
    b = s.requests[s.preempted[0]]
    s.cancel("a" if b.request_id == "b" else "b")  # room for it again
    assert s.resume() == [b] and b.status is DecodeStatus.RECOMPUTING
    ids = b.recompute_ids()
    assert ids == [*b.prompt_ids, *b.output_ids[:-1]] and len(ids) == b.num_tokens - 1
    seen = []
    while b.status is DecodeStatus.RECOMPUTING:
        chunks = s.recompute_chunks(5)
        assert sum(c.length for c in chunks) <= 5
        seen += [(c.start, c.length) for c in chunks]
        s.on_recomputed(chunks)
    assert [st for st, _ in seen] == list(range(0, len(ids), 5)) and sum(n for _, n in seen) == len(ids)
    assert b.status is DecodeStatus.READY and s.ready[0] == b.request_id  # ahead of newer arrivals


def test_a_resumed_request_holds_what_is_still_cached_of_its_kv_and_recomputes_the_rest() -> None:
    """kv_cache.prefix_cache: a victim's whole blocks stay cached (its later ones evicted first as
    the others grow); on resume it holds the surviving head again and recomputes after it."""
    s = _sched(10)
    _arrive(s, "a", 6, 30)
    _arrive(s, "b", 6, 30)
    while not s.preempted:
        _step(s, tok=40 + len(s.running))
    b = s.requests[s.preempted[0]]
    kept = s.allocator.num_cached
    assert kept > 0
    _step(s)  # the other one runs on (it may take a cached block)
    s.cancel("a" if b.request_id == "b" else "b")
    ids = b.recompute_ids()
    head = s.allocator.find(block_digests(ids, BS)[: (len(ids) - 1) // BS])  # not the block of its last token
    assert head  # its first blocks survived
    assert s.resume() == [b] and b.status is DecodeStatus.RECOMPUTING
    assert b.recomputed == len(head) * BS and b.block_table[: len(head)] == head
    chunks = s.recompute_chunks(10_000)
    assert [(c.start, c.length) for c in chunks] == [(len(head) * BS, b.num_tokens - 1 - len(head) * BS)]
    s.on_recomputed(chunks)
    assert b.status is DecodeStatus.READY
    while b.request_id in s.requests:
        _step(s)
    assert len(b.output_ids) == 30 and s.is_idle() and s.allocator.num_used == 0
    s.allocator.check()


def test_cancel_while_preempted_or_recomputing_leaves_nothing() -> None:
    for when in (DecodeStatus.PREEMPTED, DecodeStatus.RECOMPUTING):
        s = _sched(6)
        _arrive(s, "old", 4, 16)
        _arrive(s, "new", 4, 16)
        while s.requests["new"].status is not DecodeStatus.PREEMPTED:
            _step(s)
        if when is DecodeStatus.RECOMPUTING:
            s.cancel("old")
            s.resume()
        assert s.requests["new"].status is when
        s.cancel("new")
        s.cancel("old")
        s.allocator.check()
        assert s.is_idle() and s.allocator.num_used == 0, when


def test_the_watermark_keeps_room_to_grow_into() -> None:
    s = _sched(10, watermark=0.2)  # 2 blocks kept free
    sp = SamplingParams(max_tokens=8)
    assert s.reserve("a", 24, sp, EOS, [1] * 24).ok  # 6 blocks, 4 left
    r = s.reserve("b", 9, sp, EOS, [1] * 9)  # 3 blocks would leave 1 < 2
    assert not r.ok and "+2 kept free" in r.reason
    assert s.reserve("c", 8, sp, EOS, [1] * 8).ok  # 2 blocks leave 2


def test_a_request_without_prompt_ids_holds_all_it_may_need_and_is_never_preempted() -> None:
    s = _sched(10)
    assert s.reserve("plain", 4, SamplingParams(max_tokens=20, ignore_eos=True), EOS).ok  # 6 blocks of 10
    assert s.start_write("plain", 4) and s.on_kv_landed("plain", 7)
    _arrive(s, "ids", 4, 30)
    while "plain" in s.requests:
        _step(s)
        assert s.requests["plain"].status is DecodeStatus.RUNNING if "plain" in s.requests else True
    assert s.preemptions >= 1  # "ids" gave way (itself the newest that can be recomputed)
    while s.requests:
        _step(s)
    assert s.allocator.num_used == 0


@pytest.mark.parametrize("share_on_reserve", [False, True])
def test_random_traffic_every_request_ends_with_all_its_tokens_and_no_block_leaks(share_on_reserve: bool) -> None:
    """Prompts cut from three stems share prefixes: cached blocks are shared at resume (and, as on a
    decode worker, at reservation); every step checks that no row writes a shared or findable block."""
    rng = random.Random(3)
    s = DecodeScheduler(PrefixCache(40, BS), 6, 10, on_demand=True, watermark=0.05, share_on_reserve=share_on_reserve)
    stems = [[3] * 30, list(range(40, 70)), [5, 6] * 15]
    lengths: dict[str, int] = {}
    cancelled: set[str] = set()
    finished: dict[str, int] = {}
    n = 0
    for step in range(3000):
        if n < 60 and rng.random() < 0.3:
            rid, p, m = f"r{n}", rng.randint(1, 30), rng.randint(2, 40)  # 1: ends with the prefill
            sp = SamplingParams(max_tokens=m, ignore_eos=True)
            r = s.reserve(rid, p, sp, EOS, rng.choice(stems)[:p])
            if r.ok:
                assert r.dest is not None  # the prefill writes the blocks after the shared ones: its own
                assert all(s.allocator.writable(b) for b in r.dest.block_ids[r.dest.shared_blocks:-(-p // BS)])
                lengths[rid] = m
                n += 1
                assert s.start_write(rid, p) and s.on_kv_landed(rid, 7)
        if s.requests and rng.random() < 0.02:
            victim = rng.choice(sorted(s.requests))
            s.cancel(victim)
            cancelled.add(victim)
        before = {rid: r for rid, r in s.requests.items()}
        _step(s)
        for rid, r in before.items():
            if rid not in s.requests and rid not in cancelled:
                finished[rid] = len(r.output_ids)
        if n == 60 and not s.requests:
            break
    assert n == 60 and not s.requests, (n, len(s.requests))
    assert s.preemptions > 0  # the cache was too small for all of them at once
    assert s.allocator.hit_tokens > 0  # and cached blocks were shared
    assert finished == {rid: m for rid, m in lengths.items() if rid not in cancelled}
    assert s.is_idle() and s.allocator.num_used == 0


# -- workers on the tiny model -----------------------------------------------------------------
SMALL = KVCacheConfig(num_blocks=20, block_size=16)  # 320 tokens for 6 requests of ~80 each


def _texts(seed: int) -> list[str]:
    return prompts(9, seed, min_words=4, max_words=6)[2:8]  # 6 prompts of 20-45 tokens


def _run_when_room(pair, rid: str, ids: list[int], sp: SamplingParams) -> tuple[list[int], str]:  # type: ignore[no-untyped-def]
    """The router's part (tests/cpu/test_workers_inprocess._run), waiting as its queue does while
    the decode worker has no room."""
    pw, dw, _, events = pair
    for _ in range(1200):
        r = dw.reserve(rid, len(ids), sp, EOS, ids)
        if r.ok:
            break
        assert "KV cache full" in r.reason, r.reason
        time.sleep(0.05)
    res = pw.prefill(PrefillRequest(rid, ids, sp, EOS, r.dest))
    assert res.error is None and res.finished is None, res
    evs = events.take(rid, 120)
    assert not evs[-1].error, evs[-1].error
    return [res.first_token] + [t for e in evs for t in e.token_ids], evs[-1].finish_reason.value


@pytest.fixture(scope="module")
def small_pair():  # type: ignore[no-untyped-def]
    mc, tc, hub = ModelConfig(path="tiny"), TransportConfig(timeout_s=10), FakeHub()
    pw = PrefillWorker("p0", mc, PrefillConfig(chunk_tokens=2048), tc, block_size=16)
    dw = DecodeWorker("d0", mc, SMALL, DecodeConfig(max_recompute_tokens=32), tc)
    pw.start()
    dw.start()
    wire(pw, dw, "ipc", hub)
    events = Events(dw)
    yield pw, dw, hub, events
    events.close()
    pw.shutdown()
    dw.shutdown()


def _crowd(pair, texts: list[str], sp: SamplingParams) -> list[list[int]]:  # type: ignore[no-untyped-def]
    tok = tiny_tokenizer()
    with cf.ThreadPoolExecutor(len(texts)) as ex:
        futs = [ex.submit(_run_when_room, pair, f"c{i}-{sp.seed}-{len(texts)}", tok(t)["input_ids"], sp)
                for i, t in enumerate(texts)]
        out = []
        for f in futs:
            toks, reason = f.result(timeout=120)
            assert reason in ("length", "stop"), reason
            out.append(toks)
    return out


def test_decode_worker_preempts_and_recomputes_tokens_equal_hf_generate(small_pair) -> None:  # type: ignore[no-untyped-def]
    dw = small_pair[1]
    texts = _texts(21)
    before = dw.scheduler.preemptions
    got = _crowd(small_pair, texts, SamplingParams(max_tokens=48, ignore_eos=True))
    assert dw.scheduler.preemptions > before and dw.recomputed_tokens > 0  # the cache was too small
    assert got == [hf_greedy(t, 48, ignore_eos=True) for t in texts]
    assert _idle(dw, small_pair[0])


def test_seeded_draws_through_preemption_are_the_ones_drawn_alone(small_pair) -> None:  # type: ignore[no-untyped-def]
    dw = small_pair[1]
    texts = _texts(22)
    sp = SamplingParams(temperature=0.9, top_p=0.95, seed=5, max_tokens=48, ignore_eos=True)
    alone = [_crowd(small_pair, [t], sp)[0] for t in texts]
    before = dw.scheduler.preemptions
    assert _crowd(small_pair, texts, sp) == alone
    assert dw.scheduler.preemptions > before
    assert _idle(dw, small_pair[0])


def test_aggregated_worker_preempts_and_recomputes_tokens_equal_hf_generate() -> None:
    w = AggregatedWorker("a0", ModelConfig(path="tiny"), SMALL,
                         AggregatedConfig(max_batch_tokens=64, chunk_tokens=32, max_recompute_tokens=32))
    w.start()
    events = Events(w)
    tok = tiny_tokenizer()
    texts = _texts(23)
    sp = SamplingParams(max_tokens=48, ignore_eos=True)

    def one(i: int) -> list[int]:
        rid, ids = f"a{i}", tok(texts[i])["input_ids"]
        assert w.reserve(rid, len(ids), sp, EOS, ids).ok
        res = w.prefill(PrefillRequest(rid, ids, sp, EOS, None), timeout_s=60)  # type: ignore[arg-type]
        assert res.error is None, res.error
        return [res.first_token] + [t for e in events.take(rid, 60) for t in e.token_ids]

    try:
        with cf.ThreadPoolExecutor(len(texts)) as ex:
            got = list(ex.map(one, range(len(texts))))
        assert w.scheduler.preemptions > 0
        assert got == [hf_greedy(t, 48, ignore_eos=True) for t in texts]
        assert _idle(w)
    finally:
        events.close()
        w.shutdown()


def test_the_watermark_never_keeps_out_a_request_that_fits_an_empty_cache() -> None:
    """A request as long as the whole cache (kv tokens == max_model_len is allowed) must be admitted,
    and resumed after a preemption, when nothing else holds blocks: else it waits for ever."""
    s = _sched(8, watermark=0.25)  # 2 blocks kept free while others hold blocks
    assert s.reserve("whole", 30, SamplingParams(max_tokens=2), EOS, [1] * 30).ok  # 8 of 8 blocks, none held
    s.cancel("whole")
    _arrive(s, "big", 4, 28)  # 32 tokens: the whole cache
    while s.requests["big"].num_tokens < 28:
        _step(s)
    s._preempt(s.requests["big"])  # as if an older request had needed its blocks and then finished
    for _ in range(10):
        if "big" not in s.requests:
            break
        _step(s)
    assert "big" not in s.requests and s.allocator.num_used == 0  # resumed and finished


# -- moving a request from a lost decode worker (adopt) ------------------------------------------
def test_an_adopted_request_is_recomputed_first_and_goes_on_from_its_tokens() -> None:
    s = _sched(16)
    sp = SamplingParams(max_tokens=10, ignore_eos=True)
    assert not s.adopt("a", [1, 2, 3], [], sp, EOS).ok  # nothing streamed: nothing to go on from
    assert not s.adopt("a", [1, 2, 3], [4] * 10, sp, EOS).ok  # already done
    assert not s.adopt("a", [1] * 60, [4], SamplingParams(max_tokens=10), EOS).ok  # never fits 16 x 4
    assert s.adopt("a", [1, 2, 3], [4, 5, 6], sp, EOS).ok
    assert not s.adopt("a", [1, 2, 3], [4, 5, 6], sp, EOS).ok  # once
    assert not s.reserve("new", 2, sp, EOS, [1, 2]).ok  # it goes first
    assert s.resume() == [s.requests["a"]] and s.requests["a"].recompute_ids() == [1, 2, 3, 4, 5]
    s.on_recomputed(s.recompute_chunks(100))
    batch = s.schedule()
    assert [r.request_id for r in batch] == ["a"] and batch[0].num_tokens - 1 == 5  # feeds 6 at position 5
    while s.requests:
        _step(s)
    assert s.allocator.num_used == 0 and s.reserve("new", 2, sp, EOS, [1, 2]).ok


def test_upfront_adoption_holds_prompt_and_max_tokens() -> None:
    s = DecodeScheduler(PrefixCache(16, BS), 8, 10)
    assert s.adopt("a", [1, 2, 3], [4], SamplingParams(max_tokens=13), EOS).ok
    s.resume()
    assert len(s.requests["a"].block_table) == 4  # (3 + 13) / 4


def test_a_request_moved_between_aggregated_workers_mid_stream_equals_hf_generate() -> None:
    """What the router does when a decode worker is lost: the tokens the client has go to another
    worker, which recomputes the KV and decodes on; the whole answer is HF generate's."""
    workers = [AggregatedWorker(f"a{i}", ModelConfig(path="tiny"), KVCacheConfig(num_blocks=64),
                                AggregatedConfig(max_recompute_tokens=16)) for i in range(2)]
    for w in workers:
        w.start()
    events = [Events(w) for w in workers]
    text = _texts(24)[3]
    ids = tiny_tokenizer()(text)["input_ids"]
    sp = SamplingParams(max_tokens=40, ignore_eos=True)
    try:
        assert workers[0].reserve("m", len(ids), sp, EOS, ids).ok
        res = workers[0].prefill(PrefillRequest("m", ids, sp, EOS, None), timeout_s=60)  # type: ignore[arg-type]
        streamed = [res.first_token]
        for _ in range(400):  # let it stream a dozen tokens
            with events[0].cv:
                got = [t for e in events[0].by_id["m"] for t in e.token_ids]
            if len(got) >= 12:
                break
            time.sleep(0.01)
        streamed += got  # what the client has; the worker is "lost" now
        workers[0].cancel("m")
        assert workers[1].adopt("m", ids, streamed, sp, EOS).ok
        rest = [t for e in events[1].take("m", 60) for t in e.token_ids]
        assert streamed + rest == hf_greedy(text, 40, ignore_eos=True)
        assert workers[1].recomputed_tokens == len(ids) + len(streamed) - 1
        assert _idle(*workers)
    finally:
        for e in events:
            e.close()
        for w in workers:
            w.shutdown()


def _arrive_p(s: DecodeScheduler, rid: str, priority: int) -> None:
    sp = SamplingParams(max_tokens=12, ignore_eos=True, priority=priority)
    assert s.reserve(rid, 4, sp, EOS, list(range(10, 14))).ok
    assert s.start_write(rid, 4) is not None and s.on_kv_landed(rid, 7) is not None


def test_priority_picks_the_batch_and_the_victim_arrival_breaks_ties() -> None:
    """With one batch slot, the READY request of the lowest priority value runs first (arrival among
    equals); when the cache runs out, the running request with the largest value is preempted, even
    an older one, and it resumes before any less urgent one."""
    s = _sched(64, batch=1)
    for rid, prio in (("late", 2), ("first", 0), ("second", 0), ("urgent", -3)):
        _arrive_p(s, rid, prio)
    order = []
    while not s.is_idle():
        ran = _step(s)
        if ran and (not order or order[-1] != ran[0]):
            order.append(ran[0])
    assert order == ["urgent", "first", "second", "late"]
    s = _sched(4)  # 16 tokens: room for two requests of 4 + a few
    _arrive_p(s, "lazy-old", 5)
    _arrive_p(s, "eager-new", 0)
    while s.preemptions == 0:
        _step(s)
    assert s.requests["lazy-old"].status is DecodeStatus.PREEMPTED  # older, but less urgent
    assert s.requests["eager-new"].status is DecodeStatus.RUNNING
