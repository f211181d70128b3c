"""Steps in flight (engine/step_loop.py): a decode step through the CUDA-graph buffers is queued with
its sampling and the host goes on; the next step follows it with each row's token fed on the device.
On CPU the graph path runs its padded forward eagerly under Triton's interpreter (capture=False),
the same buffers and feed as on a GPU. The tokens must equal HF generate; a request that ends while
the step behind it is in flight keeps its blocks until that step has run; news (a cancel, an
arrival) completes the step in flight first; and every block comes back."""
from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("triton")

from decode_worker.aggregated import AggregatedWorker  # noqa: E402
from decode_worker.config import AggregatedConfig, DecodeConfig  # noqa: E402
from decode_worker.worker import DecodeWorker  # noqa: E402
from engine.config import KVCacheConfig, ModelConfig, TransportConfig  # noqa: E402
from engine.kv_handoff import Backend, WriteIntent, WriteOutcome  # noqa: E402
from engine.sampler import History, Sampled, needs_history, sample, sample_queued  # noqa: E402
from engine.structured import Guides, grammar_text  # noqa: E402
from engine.step_loop import InFlight, Step  # noqa: E402
from engine.tiny import tiny_tokenizer  # noqa: E402
from engine.types import FinishReason, PrefillRequest, SamplingParams  # noqa: E402
from tests.cpu.harness import hf_greedy_ids, prompts, wait_until  # noqa: E402
from tests.cpu.test_workers_inprocess import Events  # noqa: E402

EOS = (2,)


@pytest.fixture(scope="module")
def worker():  # type: ignore[no-untyped-def]
    w = AggregatedWorker("a0", ModelConfig(path="tiny", kernels="triton"), KVCacheConfig(num_blocks=256),
                         AggregatedConfig(max_batch_size=4))
    w.runner.use_decode_graphs(4, 2048, capture=False)  # what a CUDA worker does, uncaptured
    seen: list[str] = []  # what the hold rule forbids, as it happened
    complete = w._complete

    def checked(f: InFlight, behind: bool) -> None:
        for r in f.step.decode:  # each row's blocks are still its own while its step runs
            if r.request_id not in w.allocator._owned:
                seen.append(f"{r.request_id}: blocks freed while a step writing them was in flight")
        complete(f, behind)

    w._complete = checked  # type: ignore[method-assign]
    w.start()
    events = Events(w)
    yield w, events, seen
    events.close()
    w.shutdown()


def _ids(i: int) -> list[int]:
    return tiny_tokenizer()(prompts(8, seed=3)[i])["input_ids"][:40]


RESULTS: dict[str, list[int]] = {}  # request id → its first token, once its prefill answered


def _submit(w: AggregatedWorker, rid: str, ids: list[int], sp: SamplingParams) -> threading.Thread:
    """The router's part: reserve, then prefill on a thread of its own (it returns with the first token)."""
    assert w.reserve(rid, len(ids), sp, EOS, list(ids)).ok

    def go() -> None:
        res = w.prefill(PrefillRequest(rid, ids, sp, EOS, 0), timeout_s=120)
        assert res.error is None, res.error
        RESULTS[rid] = [res.first_token]

    t = threading.Thread(target=go)
    t.start()
    return t


def _tokens(events: Events, rid: str) -> tuple[list[int], FinishReason | None]:
    evs = events.take(rid, 120)
    return RESULTS.pop(rid) + [t for e in evs for t in e.token_ids], evs[-1].finish_reason


def test_steps_in_flight_decode_like_hf_and_keep_an_ended_requests_blocks(worker) -> None:  # type: ignore[no-untyped-def]
    """Four requests ending at different steps: by length (3, 9, 24) and by a stop token met while
    the step behind it runs (it comes back once that step has run)."""
    w, events, seen = worker
    before = w.steps_overlapped
    ids = [_ids(i) for i in range(4)]
    want = [hf_greedy_ids(p, 24, ignore_eos=True) for p in ids]
    end = next(i for i, t in enumerate(want[3]) if i >= 5 and want[3].index(t) == i) + 1
    stop = want[3][end - 1]  # request 3 stops at the first token it has not made before, from its 6th on
    sps = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 9, 24)]
    sps.append(SamplingParams(max_tokens=24, ignore_eos=True, stop_token_ids=(stop,)))
    threads = [_submit(w, f"a{i}", p, sp) for i, (p, sp) in enumerate(zip(ids, sps))]
    for t in threads:
        t.join(120)
    got = [_tokens(events, f"a{i}") for i in range(4)]
    assert [g[0] for g in got] == [want[0][:3], want[1][:9], want[2], want[3][:end]]
    assert [g[1] for g in got] == [FinishReason.LENGTH] * 3 + [FinishReason.STOP]
    assert w.steps_overlapped > before + 10  # most steps followed one in flight
    assert seen == []
    assert wait_until(w.check_idle, 10)  # every block back, none held


def test_a_cancel_or_an_arrival_completes_the_step_in_flight_first(worker) -> None:  # type: ignore[no-untyped-def]
    """A request cancelled mid-stream stops (its blocks back at once, nothing in flight writes
    them); one arriving mid-stream joins; the others' tokens are unchanged."""
    w, events, seen = worker
    ids = [_ids(i) for i in range(4, 7)]
    want = [hf_greedy_ids(p, 40, ignore_eos=True) for p in ids]
    sp = SamplingParams(max_tokens=40, ignore_eos=True)
    threads = [_submit(w, f"b{i}", ids[i], sp) for i in range(2)]
    for t in threads:
        t.join(120)
    assert wait_until(lambda: len(events.by_id["b0"]) >= 5, 60)
    w.cancel("b1")
    late = _submit(w, "b2", ids[2], sp)
    late.join(120)
    b0, b2 = _tokens(events, "b0"), _tokens(events, "b2")
    b1 = _tokens(events, "b1")
    assert b0 == (want[0], FinishReason.LENGTH) and b2 == (want[2], FinishReason.LENGTH)
    assert b1[1] is FinishReason.CANCELLED and b1[0] == want[1][: len(b1[0])] and len(b1[0]) < 40
    assert seen == []
    assert wait_until(w.check_idle, 10)


def _both_ways(w: AggregatedWorker, events: Events, tag: str, ids: list[list[int]],
               sps: list[SamplingParams]) -> list[tuple[list[int], FinishReason | None]]:
    """The requests run together with steps in flight (at least 5 of them follow one), then again
    with every step complete: the same tokens both ways."""

    def run(t: str) -> list[tuple[list[int], FinishReason | None]]:
        ts = [_submit(w, f"{t}{i}", p, sp) for i, (p, sp) in enumerate(zip(ids, sps))]
        for th in ts:
            th.join(120)
        return [_tokens(events, f"{t}{i}") for i in range(len(ids))]

    before = w.steps_overlapped
    flying = run(tag + "f")
    assert w.steps_overlapped > before + 5
    w.overlap_steps = False
    try:
        completed = run(tag + "c")
    finally:
        w.overlap_steps = True
    assert flying == completed
    return flying


def test_rows_with_penalties_or_a_grammar_follow_in_flight_and_sample_what_complete_turns_do(worker) -> None:  # type: ignore[no-untyped-def]
    """Rows whose draw reads the tokens before them (penalties, a grammar): a step that follows one
    in flight samples them once that one has completed, its forward already queued. Before, such a
    row made every step a complete turn. Plain greedy rows beside them still decode like HF."""
    w, events, seen = worker
    ids = [_ids(i) for i in (7, 1, 4)]
    sps = [SamplingParams(max_tokens=14, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4,
                          temperature=0.9, seed=21, ignore_eos=True),
           SamplingParams(max_tokens=14, ignore_eos=True),
           SamplingParams(max_tokens=14, grammar=grammar_text("regex", r"(ab|cd)+!"), temperature=1.0, seed=23)]
    assert [needs_history(sp) for sp in sps] == [True, False, True]
    got = _both_ways(w, events, "h", ids, sps)
    assert got[1] == (hf_greedy_ids(ids[1], 14, ignore_eos=True), FinishReason.LENGTH)
    answer = tiny_tokenizer().decode(got[2][0])
    assert got[2][1] == FinishReason.STOP and answer.endswith("!") and set(answer[:-1]) <= set("abcd"), answer
    assert seen == []
    assert wait_until(w.check_idle, 10)


def test_rows_with_a_bias_allowed_tokens_or_min_tokens_are_sampled_as_launched_counting_the_token_in_flight(worker) -> None:  # type: ignore[no-untyped-def]
    """A logit_bias, allowed_token_ids and a pending min_tokens need no token before: such rows are
    sampled as their step is launched, at the position and count after the token still in flight
    (a seeded row's key; min_tokens lifts its EOS ban at the same token as complete turns do)."""
    w, events, seen = worker
    ids = [_ids(i) for i in (4, 6, 2)]
    sps = [SamplingParams(max_tokens=20, min_tokens=9, logit_bias=((EOS[0], 8.0), (100, 3.0)), temperature=0.8, seed=22),
           SamplingParams(max_tokens=12, allowed_token_ids=tuple(range(60, 90)), temperature=1.3, seed=24, ignore_eos=True),
           SamplingParams(max_tokens=12, temperature=0.7, seed=25, ignore_eos=True, logprobs=1)]
    assert not any(needs_history(sp) for sp in sps)
    got = _both_ways(w, events, "b", ids, sps)
    assert got[0] == (got[0][0][:9] + [EOS[0]], FinishReason.STOP) and EOS[0] not in got[0][0][:9]  # EOS as soon as allowed
    assert all(60 <= t < 90 for t in got[1][0])
    assert seen == []
    assert wait_until(w.check_idle, 10)


def test_drawn_rows_follow_in_flight_and_draw_what_complete_turns_draw(worker) -> None:  # type: ignore[no-untyped-def]
    """Seeded rows with a temperature, top-k, top-p and min-p: steps follow one in flight (the
    draw needs no host sync), and each row's tokens are those it draws with every step completed."""
    w, events, seen = worker
    ids = [_ids(i) for i in (2, 3, 5)]
    sps = [SamplingParams(max_tokens=16, temperature=0.8, seed=11, ignore_eos=True),
           SamplingParams(max_tokens=16, temperature=1.2, top_k=20, top_p=0.9, seed=12, ignore_eos=True, logprobs=2),
           SamplingParams(max_tokens=16, temperature=0.7, top_p=0.8, min_p=0.05, seed=13, ignore_eos=True)]

    def run(tag: str) -> list[tuple[list[int], FinishReason | None]]:
        ts = [_submit(w, f"{tag}{i}", p, sp) for i, (p, sp) in enumerate(zip(ids, sps))]
        for t in ts:
            t.join(120)
        return [_tokens(events, f"{tag}{i}") for i in range(len(ids))]

    before = w.steps_overlapped
    flying = run("d")
    assert w.steps_overlapped > before + 5
    w.overlap_steps = False
    try:
        completed = run("e")
    finally:
        w.overlap_steps = True
    assert flying == completed and all(r == FinishReason.LENGTH and len(t) == 16 for t, r in flying)
    assert seen == []
    assert wait_until(w.check_idle, 10)


def test_sample_queued_equals_sample_for_every_kind_of_row() -> None:
    """Greedy and drawn rows, logprobs, NaN logits, penalties over a history, a logit_bias,
    allowed_token_ids, banned tokens and a grammar's mask, all in one batch: the queued draw (a step
    in flight's) gives sample()'s tokens and logprobs, and does not read the logits after it returns."""
    V = 259
    logits = torch.randn(9, V, generator=torch.Generator().manual_seed(0))
    logits[2, 7] = float("nan")
    logits[6] = float("nan")  # a drawn row with nothing finite: its best raw token, as sample() gives
    guide = Guides(tiny_tokenizer, V).new(grammar_text("regex", r"(ab|cd)+!"))
    guide.follow(tiny_tokenizer()("ab")["input_ids"])
    params = [SamplingParams(), SamplingParams(logprobs=3), SamplingParams(logprobs=0),
              SamplingParams(repetition_penalty=1.5, frequency_penalty=0.7, logprobs=1),
              SamplingParams(logit_bias=((5, 9.0), (6, -9.0))), SamplingParams(temperature=0.9, seed=4, logprobs=2),
              SamplingParams(temperature=1.5, top_k=5, top_p=0.7, min_p=0.1, seed=5),
              SamplingParams(temperature=1.2, seed=6, allowed_token_ids=(10, 11, 12), min_tokens=2),
              SamplingParams(temperature=0.7, seed=7, grammar="g", presence_penalty=1.0)]
    histories = [None, None, None, History([3, 4, 5], [int(logits[3].argmax()), 9]), None, None, None, None,
                 History([1], [97, 98])]
    banned = [(), (), (), (), (), (), (), (11, 2), ()]
    guides = [None] * 8 + [guide]
    args = (params, list(range(9)), histories, banned, guides)
    want = sample(logits.clone(), *args)
    got = sample_queued(logits, *args)
    assert isinstance(got, Sampled)
    logits[:] = 0  # the buffer may be overwritten once sample_queued returns (a graph's output)
    assert got.collect() == want
    assert want[0][7] in (10, 12) and tiny_tokenizer().decode([want[0][8]]) in ("a", "c", "!")  # allowed, not banned; the grammar's


def test_needs_history_is_a_row_whose_draw_reads_the_tokens_before_it() -> None:
    assert needs_history(SamplingParams(repetition_penalty=1.2)) and needs_history(SamplingParams(grammar="g"))
    assert needs_history(SamplingParams(frequency_penalty=0.1)) and needs_history(SamplingParams(presence_penalty=-1.0))
    assert not needs_history(SamplingParams(temperature=0.5, top_p=0.9, top_k=40, min_p=0.1, seed=1))
    assert not needs_history(SamplingParams(logit_bias=((5, 1.0),), allowed_token_ids=(5, 6), min_tokens=4))


def test_held_blocks_come_back_only_when_released() -> None:
    """The scheduler's side of the rule: while hold_kv, an ended request's blocks stay taken."""
    from decode_worker.scheduler import DecodeScheduler
    from engine.prefix_cache import PrefixCache

    s = DecodeScheduler(PrefixCache(16, 4), max_batch_size=4, reserve_timeout_s=10)
    sp = SamplingParams(max_tokens=2)
    assert s.reserve("r", 4, sp, EOS).ok and s.start_write("r", 4) is not None
    s.on_kv_landed("r", 7)
    batch = s.schedule()
    s.hold_kv = True
    s.on_tokens(batch, [8])
    s.hold_kv = False
    assert "r" not in s.requests and s.allocator.num_used == 2  # ended, its blocks held
    s.release_held()
    assert s.allocator.num_used == 0 and s.held == []


def test_overlap_steps_false_completes_every_step(worker) -> None:  # type: ignore[no-untyped-def]
    w, events, _ = worker
    w.overlap_steps = False
    try:
        before, ids = w.steps_overlapped, _ids(5)
        _submit(w, "d0", ids, SamplingParams(max_tokens=10, ignore_eos=True)).join(120)
        assert _tokens(events, "d0") == (hf_greedy_ids(ids, 10, ignore_eos=True), FinishReason.LENGTH)
        assert w.steps_overlapped == before
    finally:
        w.overlap_steps = True


def test_blocks_held_past_a_failed_step_come_back_at_the_next_complete_turn(worker) -> None:  # type: ignore[no-untyped-def]
    """Held blocks are freed when the step behind completes — or, if that step failed before it
    could, at the next complete turn (nothing is in flight then)."""
    w, _, _ = worker
    s = w.scheduler
    with w.lock:
        assert s.reserve("h", 4, SamplingParams(max_tokens=4), EOS).ok
        s.hold_kv = True
        s.cancel("h")
        s.hold_kv = False
        assert s.held and w.allocator.num_used > 0
    w.cancel("nobody")  # news: the loop runs a complete turn
    assert wait_until(lambda: not s.held, 10)
    assert wait_until(w.check_idle, 10)


def test_a_row_crossing_into_a_new_block_still_follows_in_flight(worker) -> None:  # type: ignore[no-untyped-def]
    """One request of 40 prompt tokens and 40 generated: its tokens go to positions 40..79, and those
    at 48 and 64 start a block. The step feeding each is given its block while the one before is in
    flight, so every decode step but the first follows one (before: each crossing cost a complete
    turn — at 64 streams whose positions differ, nearly every step). Tokens == HF generate."""
    w, events, seen = worker
    ids = _ids(6)
    assert len(ids) == 40
    steps, overlapped = w.steps, w.steps_overlapped
    _submit(w, "g0", ids, SamplingParams(max_tokens=40, ignore_eos=True)).join(120)
    assert _tokens(events, "g0") == (hf_greedy_ids(ids, 40, ignore_eos=True), FinishReason.LENGTH)
    assert w.steps - steps == 40  # the prompt, then 39 decode steps
    assert w.steps_overlapped - overlapped == 38  # all but the first decode step
    assert seen == []
    assert wait_until(w.check_idle, 10)


def _running(w: AggregatedWorker, rid: str, prompt_len: int) -> Step:
    """A request decoding on an unstarted worker (the test is its loop): its first step, as launched."""
    s = w.scheduler
    assert w.reserve(rid, prompt_len, SamplingParams(max_tokens=8, ignore_eos=True), EOS,
                     list(range(3, 3 + prompt_len))).ok
    assert s.start_prefill(rid) is not None and s.on_prefilled(rid, 5) is not None
    batch = s.schedule()
    rows, drafts = w._decode_rows(batch)
    return Step(batch, [], rows, [], drafts)


def test_a_step_that_follows_grows_the_block_its_row_needs_or_runs_a_complete_turn() -> None:
    w = AggregatedWorker("g1", ModelConfig(path="tiny", kernels="triton"),
                         KVCacheConfig(num_blocks=3, block_size=16, watermark=0.0), AggregatedConfig(max_batch_size=4))
    w.runner.use_decode_graphs(4, 2048, capture=False)
    first = _running(w, "r", 15)  # 15 prompt tokens + the first: one full block; its next token starts a second
    req = first.decode[0]
    assert len(req.block_table) == 1 and first.seqs[0].start_pos == 15
    nxt = w._follow(InFlight(first, None))
    assert nxt is not None and nxt.decode == [req] and nxt.seqs[0].start_pos == 16
    assert len(req.block_table) == 2 and w.allocator.num_used == 2
    other = _running(w, "o", 15)  # takes the last free block
    assert w.allocator.num_free == 0
    full = Step([req], [], [nxt.seqs[0]], [])
    req.output_ids += [5] * 16  # its next token starts a third block; none is free
    assert w._follow(InFlight(full, None)) is None  # a complete turn: schedule() preempts for it
    assert len(req.block_table) == 2 and w.allocator.num_free == 0
    assert other.decode[0].block_table and w.steps_overlapped == 0


def test_a_write_still_being_written_does_not_stop_steps_following_in_flight() -> None:
    """A decode worker whose batch decodes in flight while another request's KV is being written:
    the write needs nothing of the loop until it lands (its landing nudges the loop), so steps go on
    following one in flight meanwhile (before: none did while any write was pending — on a decode
    worker taking hand-offs all the time, most steps). Once it ends, it is handled."""
    dw = DecodeWorker("d9", ModelConfig(path="tiny", kernels="triton"), KVCacheConfig(num_blocks=64),
                      DecodeConfig(max_batch_size=4), TransportConfig(timeout_s=60))
    dw.runner.use_decode_graphs(4, 2048, capture=False)
    dw.receiver.add_peer("p0", Backend.IPC)
    dw.start()
    events = Events(dw)
    try:
        ids = _ids(4)
        sp = SamplingParams(max_tokens=60, ignore_eos=True)
        _submit(dw, "w0", ids, sp).join(120)  # computed by the decode worker itself; it decodes on
        assert wait_until(lambda: len(events.by_id["w0"]) >= 3, 60)
        assert dw.reserve("w1", 20, sp, EOS, list(range(3, 23))).ok
        assert dw.begin_write(WriteIntent("w1", "p0", 20, 7, Backend.IPC)).ok
        overlapped = dw.steps_overlapped
        assert wait_until(lambda: dw.steps_overlapped >= overlapped + 10, 60)
        assert dw.receiver.pending == 1  # still being written all along
        dw.end_write(WriteOutcome("w1", "p0", False, "the writer gave up"))
        w1 = events.take("w1", 30)
        assert w1[-1].finish_reason is FinishReason.ERROR and "the writer gave up" in (w1[-1].error or "")
        assert _tokens(events, "w0") == (hf_greedy_ids(ids, 60, ignore_eos=True), FinishReason.LENGTH)
        assert wait_until(dw.check_idle, 10)
    finally:
        events.close()
        dw.shutdown()


def test_prompt_chunks_share_graphed_steps_with_decode_rows_and_tokens_equal_hf() -> None:
    """An aggregated worker's graphs as a CUDA worker's take its whole step (BatchWorker: step_tokens
    rows): a prompt's chunks, and prompts arriving while others decode, run as rows of the graphs
    beside the decode rows; every answer == HF, and every block comes back."""
    w = AggregatedWorker("g2", ModelConfig(path="tiny", kernels="triton"), KVCacheConfig(num_blocks=128),
                         AggregatedConfig(max_batch_size=4, max_batch_tokens=32, chunk_tokens=16))
    w.runner.use_decode_graphs(4, 2048, capture=False, max_rows=32)
    g = w.runner.graphs
    assert g is not None
    run, prompt_rows = g.run, []

    def counted(seqs, feed=None):  # type: ignore[no-untyped-def]
        prompt_rows.append(sum(s.num_new for s in seqs if s.num_new > 1))
        return run(seqs, feed)

    g.run = counted  # type: ignore[method-assign]
    w.start()
    events = Events(w)
    try:
        ids = [[3 + (7 * i + 5 * j) % 250 for j in range(24)] for i in range(3)]  # 24 tokens: chunks of 16, 8
        want = [hf_greedy_ids(p, 8, ignore_eos=True) for p in ids]
        sp = SamplingParams(max_tokens=8, ignore_eos=True)
        _submit(w, "c0", ids[0], sp).join(120)
        assert wait_until(lambda: len(events.by_id["c0"]) >= 2, 60)  # c0 decodes; c1 and c2 arrive
        threads = [_submit(w, f"c{i}", ids[i], sp) for i in (1, 2)]
        for t in threads:
            t.join(120)
        assert [_tokens(events, f"c{i}")[0] for i in range(3)] == want
        assert sum(prompt_rows) == 3 * 24  # every prompt token a row of the graphs
        assert wait_until(w.check_idle, 10)
    finally:
        events.close()
        w.shutdown()
