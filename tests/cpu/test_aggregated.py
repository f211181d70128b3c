"""mode: aggregated, the baseline: one worker prefills and decodes (continuous Sarathi or static batches).

In-process workers (no Ray) check tokens, mixing and the lifecycle; one Ray cluster checks the wiring.
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from typing import Any

import pytest
import ray
import torch

from decode_worker.aggregated import AggregatedWorker
from decode_worker.config import AggregatedConfig
from engine.config import KVCacheConfig, ModelConfig
from engine.tiny import tiny_tokenizer
from engine.types import FinishReason, PrefillRequest, SamplingParams
from protos.pdserve.v1 import generation_pb2 as pb
from tests.cpu.harness import RunningServer, _tiny, hf_greedy, prompts, tiny_config, wait_until
from tests.cpu.test_workers_inprocess import Events

EOS = (2,)


class Worker:
    """An aggregated worker plus the router's part (reserve → prefill → poll)."""

    def __init__(self, cfg: AggregatedConfig) -> None:
        self.w = AggregatedWorker("a0", ModelConfig(path="tiny"), KVCacheConfig(num_blocks=512), cfg)
        self.w.start()
        self.events = Events(self.w)
        self.tok = tiny_tokenizer()
        self.cached: dict[str, int] = {}  # request id → prompt tokens found in the prefix cache

    def close(self) -> None:
        self.events.close()
        self.w.shutdown()

    def run(self, rid: str, prompt: str, max_tokens: int, ignore_eos: bool = False) -> list[int]:
        return self.run_ids(rid, self.tok(prompt)["input_ids"], max_tokens, ignore_eos)

    def run_ids(self, rid: str, ids: list[int], max_tokens: int, ignore_eos: bool = False, salt: str = "") -> list[int]:
        """As the router: reserve with the prompt ids (its KV may be recomputed, cached, shared)."""
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
        assert self.w.reserve(rid, len(ids), sp, EOS, list(ids), salt).ok
        res = self.w.prefill(PrefillRequest(rid, ids, sp, EOS, 0, cache_salt=salt), timeout_s=60)
        assert res.error is None, res.error
        self.cached[rid] = res.cached_tokens
        if res.finished is not None:
            return [res.first_token]
        return [res.first_token] + [t for e in self.events.take(rid, 60) for t in e.token_ids]


@pytest.fixture(scope="module", params=["continuous", "static"])
def worker(request):  # type: ignore[no-untyped-def]
    # a small step budget so long prompts go in chunks that share steps with running decodes
    w = Worker(AggregatedConfig(batching=request.param, max_batch_tokens=48, chunk_tokens=32, max_batch_size=8))
    yield w
    w.close()


def test_greedy_equals_hf_generate(worker: Worker) -> None:
    for i, p in enumerate(prompts(8, seed=11)):
        assert worker.run(f"g{i}", p, 12) == hf_greedy(p, 12), p
    assert worker.w.check_idle()


def test_concurrent_requests_equal_solo(worker: Worker) -> None:
    ps = prompts(12, seed=12)  # more than max_batch_size: static runs two batches
    with cf.ThreadPoolExecutor(len(ps)) as ex:
        futs = {p: ex.submit(worker.run, f"c{i}", p, 20, True) for i, p in enumerate(ps)}
        got = {p: f.result() for p, f in futs.items()}
    assert got == {p: hf_greedy(p, 20, ignore_eos=True) for p in ps}
    assert wait_until(worker.w.check_idle, 5)
    s = worker.w.stats()
    assert s.role == "aggregated" and s.prompt_tokens_computed > 0 and s.kv_blocks_used == 0


def test_stats_say_where_the_loop_time_went(worker: Worker) -> None:
    """bench/engine.py reads these to split a serving step into schedule, run (the forward),
    postprocess (sampling, events) and idle."""
    before = worker.w.stats().extra
    worker.run("loop-time", "where does the time go", 16, ignore_eos=True)
    after = worker.w.stats().extra
    spent = {k: after["loop_s"][k] - before["loop_s"][k] for k in after["loop_s"]}
    assert set(spent) == {"idle", "schedule", "run", "postprocess"}
    assert after["steps"] - before["steps"] >= 16  # one prompt step (or more chunks) + 15 decode steps
    assert spent["run"] > 0 and spent["postprocess"] > 0 and spent["schedule"] > 0
    assert all(v >= 0 for v in spent.values())


def hf_greedy_ids(ids: list[int], max_new_tokens: int) -> list[int]:
    model, _ = _tiny()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                             eos_token_id=model.generation_config.eos_token_id)
    return out[0, len(ids):].tolist()


SYSTEM = "You are a terse assistant. Answer in one line. Context: the river runs past the old mill. "  # 90 bytes


def test_a_prompt_sharing_a_prefix_computes_only_the_rest_and_equals_hf(worker: Worker) -> None:
    """kv_cache.prefix_cache: the second prompt's first 5 blocks (80 tokens) are the first's KV,
    held again; it computes only its own tokens."""
    w = worker.w
    first, second = SYSTEM + "Where is the mill?", SYSTEM[:80] + "Who built the mill, and when?"
    assert worker.run("pfx-a", first, 12) == hf_greedy(first, 12)
    hits, computed = w.allocator.hit_tokens, w.prompt_tokens_computed
    assert worker.run("pfx-b", second, 12) == hf_greedy(second, 12)
    assert worker.cached["pfx-b"] == w.allocator.hit_tokens - hits == 80
    assert w.prompt_tokens_computed - computed == len(worker.tok(second)["input_ids"]) - 80
    assert wait_until(w.check_idle, 5) and w.allocator.num_cached > 0  # kept, but held by nobody
    worker.events.by_id.clear()


def test_a_burst_sharing_a_system_prompt_computes_it_once() -> None:
    """Six prompts in one step's queue behind one 96-token system prompt: one computes it, the others
    wait a step for its blocks instead of computing them too."""
    w = Worker(AggregatedConfig(max_batch_tokens=1024, chunk_tokens=512))  # all six fit one step
    system = ("A system prompt nobody has sent yet. " * 3)[:96] + "\n"  # 97 bytes: 6 whole blocks
    ps = [system + q for q in ("Where is it?", "Who made it?", "How old is it?", "Is it open?",
                               "Can I visit?", "Why a mill?")]
    schedule, gathered = w.w._schedule, threading.Event()

    def first_step_sees_them_all() -> Any:
        if not gathered.is_set():
            gathered.set()
            wait_until(lambda: len(w.w.prompts.scheduler.waiting) == len(ps), 10)
        return schedule()

    w.w._schedule = first_step_sees_them_all  # type: ignore[method-assign]
    try:
        with cf.ThreadPoolExecutor(len(ps)) as ex:
            got = list(ex.map(lambda ip: w.run(f"burst{ip[0]}", ip[1], 8), enumerate(ps)))
        assert got == [hf_greedy(p, 8) for p in ps]
        assert w.w.allocator.hit_tokens == 5 * 96
        assert w.w.prompt_tokens_computed == sum(len(w.tok(p)["input_ids"]) for p in ps) - 5 * 96
        assert wait_until(w.w.check_idle, 5)
    finally:
        w.close()


def test_the_next_turn_reuses_the_kv_of_the_previous_answer(worker: Worker) -> None:
    """Output blocks are cached too: a conversation's next prompt (prompt + answer + more) finds the
    KV of all of it but the answer's last token (never fed), in whole blocks."""
    ids1 = worker.tok(SYSTEM + "Tell me about the mill.")["input_ids"]
    out1 = worker.run_ids("turn1", ids1, 30, ignore_eos=True)
    ids2 = ids1 + out1 + worker.tok(" And then?")["input_ids"]
    assert worker.run_ids("turn2", ids2, 10) == hf_greedy_ids(ids2, 10)
    assert worker.cached["turn2"] == (len(ids1) + len(out1) - 1) // 16 * 16 > len(ids1) // 16 * 16
    assert wait_until(worker.w.check_idle, 5)
    worker.events.by_id.clear()


def test_prompts_share_cached_kv_only_under_the_same_cache_salt(worker: Worker) -> None:
    ids = worker.tok("Salted prompt " * 7)["input_ids"]  # 98 bytes: 6 whole blocks before its last token's
    worker.run_ids("salt-a", ids, 4, salt="tenant-a")
    worker.run_ids("salt-b", ids, 4, salt="tenant-b")
    worker.run_ids("salt-none", ids, 4)
    worker.run_ids("salt-a2", ids, 4, salt="tenant-a")
    assert [worker.cached[k] for k in ("salt-a", "salt-b", "salt-none", "salt-a2")] == [0, 0, 0, 96]
    assert wait_until(worker.w.check_idle, 5)
    worker.events.by_id.clear()


def test_cancel_while_queued_or_prefilling_frees_its_blocks(worker: Worker) -> None:
    w = worker.w
    ids = tiny_tokenizer()(" ".join(["long prompt"] * 60))["input_ids"]
    sp = SamplingParams(max_tokens=50, ignore_eos=True)
    results = {}
    threads = []
    for i in range(3):
        rid = f"x{i}"
        assert w.reserve(rid, len(ids), sp, EOS).ok
        t = threading.Thread(target=lambda r=rid: results.__setitem__(r, w.prefill(PrefillRequest(r, ids, sp, EOS, 0))))
        t.start()
        threads.append(t)
    time.sleep(0.05)
    for i in range(3):
        w.cancel(f"x{i}")
    for t in threads:
        t.join(30)
    assert all(not t.is_alive() for t in threads)
    assert len(results) == 3  # every caller got an answer: tokens or "cancelled"
    assert wait_until(w.check_idle, 10)
    worker.events.by_id.clear()


def test_prefill_past_its_deadline_ends_the_request_and_frees_its_blocks(worker: Worker) -> None:
    ids = tiny_tokenizer()(" ".join(["slow"] * 150))["input_ids"]  # ~750 tokens: many chunks
    sp = SamplingParams(max_tokens=8)
    assert worker.w.reserve("late", len(ids), sp, EOS).ok
    res = worker.w.prefill(PrefillRequest("late", ids, sp, EOS, 0), timeout_s=0.01)
    assert res.finished is FinishReason.ERROR and "did not finish" in (res.error or "")
    assert wait_until(worker.w.check_idle, 10)  # nobody had to cancel it
    worker.events.by_id.clear()


def test_prefill_whose_deadline_passes_between_last_chunk_and_first_token_leaves_no_waiter(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller gives up after the prompt's last chunk ran but before its first token is answered:
    the id must not stay 'being prefilled' (a retry under it would be refused forever)."""
    w = worker.w
    reached, gave_up = threading.Event(), threading.Event()
    prefilled = w._prefilled

    def late(*args: object) -> None:  # the first token is sampled; its answer waits for the deadline
        reached.set()
        gave_up.wait(10)
        prefilled(*args)

    monkeypatch.setattr(w, "_prefilled", late)
    ids = tiny_tokenizer()("the first token comes late")["input_ids"]
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    assert w.reserve("race", len(ids), sp, EOS).ok
    res = w.prefill(PrefillRequest("race", ids, sp, EOS, 0), timeout_s=2)
    gave_up.set()
    assert reached.is_set() and res.finished is FinishReason.ERROR and "did not finish" in (res.error or "")
    monkeypatch.undo()
    assert wait_until(w.check_idle, 10)
    assert "race" not in w.prompts and w.prompts.num_waiting_callers == 0
    worker.events.by_id.clear()  # the timed-out request's events
    assert worker.run("race", "the first token comes late", 4, True) == hf_greedy("the first token comes late", 4, True)
    worker.events.by_id.clear()


def test_prefill_without_reservation_is_refused(worker: Worker) -> None:
    sp = SamplingParams(max_tokens=4)
    res = worker.w.prefill(PrefillRequest("nobody", [5, 6, 7], sp, EOS, 0), timeout_s=5)
    assert res.finished is FinishReason.ERROR and "reserve" in (res.error or "")


def test_a_cancel_that_reaches_the_worker_before_its_prefill_call_ends_the_prompt_too() -> None:
    """Found by `bench/soak.py --mode aggregated`: the router's cancel (its deadline passed) reached
    the worker before the prefill call it raced with; the prompt was queued for a request the next
    step ended, and that step's look-up of its blocks killed the worker's loop (every later request
    hung). Now the prompt ends with the request: its caller is told, the loop goes on."""
    w = AggregatedWorker("a0", ModelConfig(path="tiny"), KVCacheConfig(num_blocks=64), AggregatedConfig())
    events = Events(w)
    try:
        ids = tiny_tokenizer()("raced")["input_ids"]
        sp = SamplingParams(max_tokens=4, ignore_eos=True)
        assert w.reserve("r", len(ids), sp, EOS, ids).ok
        w.cancel("r")  # to be taken at the next step: the loop is not running yet
        with cf.ThreadPoolExecutor(1) as ex:
            call = ex.submit(w.prefill, PrefillRequest("r", ids, sp, EOS, 0), 10)
            assert wait_until(lambda: "r" in w.prompts, 5)  # queued behind the cancel
            w.start()
            res = call.result(15)
        assert res.finished is FinishReason.ERROR and res.error == "cancelled"
        assert wait_until(w.check_idle, 5)
        assert w.reserve("next", len(ids), sp, EOS, ids).ok  # the loop lives on
        assert w.prefill(PrefillRequest("next", ids, sp, EOS, 0), 10).error is None
        assert len([t for e in events.take("next", 10) for t in e.token_ids]) == 3
    finally:
        events.close()
        w.shutdown()


def test_continuous_mixes_prompt_chunks_into_decode_steps() -> None:
    """A long prompt arriving while another request decodes is computed in chunks alongside it, so the
    running request keeps getting tokens (static batching would make it wait for its batch to end)."""
    w = Worker(AggregatedConfig(batching="continuous", max_batch_tokens=48, chunk_tokens=32))
    try:
        tok = tiny_tokenizer()
        sp_long = SamplingParams(max_tokens=200, ignore_eos=True)
        a = tok("hello there")["input_ids"]
        assert w.w.reserve("running", len(a), sp_long, EOS).ok
        assert w.w.prefill(PrefillRequest("running", a, sp_long, EOS, 0)).error is None
        steps0 = w.w.steps
        b = tok(" ".join(["document"] * 40))["input_ids"]  # ~360 tokens = ~8 chunks of 32 + 16 decodes
        sp = SamplingParams(max_tokens=4)
        assert w.w.reserve("long", len(b), sp, EOS).ok
        res = w.w.prefill(PrefillRequest("long", b, sp, EOS, 0))
        assert res.error is None
        assert w.w.steps - steps0 >= len(b) // 47  # decode steps ran while the prompt was chunked
        got = [res.first_token] + [t for e in w.events.take("long") for t in e.token_ids]
        assert got == hf_greedy(tok.decode(b), 4)
        w.w.cancel("running")
        assert wait_until(w.w.check_idle, 10)
    finally:
        w.close()


def test_static_batching_makes_newcomers_wait_for_the_batch_to_end() -> None:
    w = Worker(AggregatedConfig(batching="static", max_batch_size=4))
    try:
        tok = tiny_tokenizer()
        a = tok("first batch")["input_ids"]
        sp_a = SamplingParams(max_tokens=80, ignore_eos=True)
        assert w.w.reserve("a", len(a), sp_a, EOS).ok
        assert w.w.prefill(PrefillRequest("a", a, sp_a, EOS, 0)).error is None
        b = tok("late arrival")["input_ids"]
        sp_b = SamplingParams(max_tokens=4, ignore_eos=True)
        assert w.w.reserve("b", len(b), sp_b, EOS).ok
        res = w.w.prefill(PrefillRequest("b", b, sp_b, EOS, 0))
        assert res.error is None
        with w.w.lock:
            assert "a" not in w.w.scheduler.requests  # b was prefilled only after a had finished
        assert len([t for e in w.events.take("a") for t in e.token_ids]) == 79
        assert [res.first_token] + [t for e in w.events.take("b") for t in e.token_ids] == hf_greedy(
            "late arrival", 4, ignore_eos=True)
        assert wait_until(w.w.check_idle, 10)
    finally:
        w.close()


# -- the Ray cluster in aggregated mode -------------------------------------------------------------
def test_cluster_aggregated_mode_serves_through_the_router() -> None:
    ray.init(num_cpus=2, include_dashboard=False, namespace="pdserve-test")
    srv = RunningServer(tiny_config(aggregated={"replicas": 2, "num_cpus": 0.5}, mode="aggregated"))
    try:
        ps = prompts(10, seed=13)
        with cf.ThreadPoolExecutor(len(ps)) as ex:
            futs = {p: ex.submit(srv.generate, prompt=p, max_tokens=16, ignore_eos=True) for p in ps}
            got = {p: list(f.result().token_ids) for p, f in futs.items()}
        assert got == {p: hf_greedy(p, 16, ignore_eos=True) for p in ps}
        status = srv.status()
        assert [w.role for w in status] == ["aggregated", "aggregated"]
        assert all(w.prompt_tokens_computed > 0 and w.tokens_generated > 0 for w in status)
        assert wait_until(lambda: all(w.kv_blocks_used == 0 for w in srv.status()), 10)
        # the tokens came over each worker's event stream, not through Ray (engine/event_stream.py)
        assert all(s.extra["event_frames"] > 0 for s in ray.get([w.stats.remote() for w in srv.cluster.decodes]))

        # a prompt sharing a cached prefix goes to the worker that holds it (when as busy as the
        # other: by load alone the tie goes to worker 0), which computes only the rest
        busy = pb.GenerateRequest(prompt="keep busy", max_tokens=1000, ignore_eos=True)
        busy0 = srv.stub.GenerateStream(busy, timeout=60)
        next(busy0)  # on worker 0 (both idle)
        system = "Shared instructions for every request of this test, long enough for five blocks. "  # 84 bytes
        first = srv.generate(prompt=system + "First?", max_tokens=4)  # on worker 1, the idler
        busy1 = srv.stub.GenerateStream(busy, timeout=60)
        next(busy1)  # on worker 1: both as busy now
        again = [srv.generate(prompt=system + f"Question {i}?", max_tokens=4) for i in range(3)]
        busy0.cancel()
        busy1.cancel()
        assert first.usage.cached_tokens == 0 and [r.usage.cached_tokens for r in again] == [80] * 3
        assert [list(r.token_ids) for r in again] == [hf_greedy(system + f"Question {i}?", 4) for i in range(3)]
        assert wait_until(lambda: all(w.kv_blocks_used == 0 for w in srv.status()), 10)

        # a worker dies: its request moves to the other one and goes on there; new ones go there
        req = pb.GenerateRequest(prompt="long running", max_tokens=300, ignore_eos=True)
        streams = [srv.stub.GenerateStream(req, timeout=60) for _ in range(2)]
        got_tokens = [list(next(st).token_ids) for st in streams]  # both running, one per worker
        ray.kill(srv.cluster.decodes[1], no_restart=True)
        for toks, st in zip(got_tokens, streams):
            for msg in st:
                toks += msg.token_ids
        assert got_tokens == [hf_greedy("long running", 300, ignore_eos=True)] * 2  # unbroken answers
        assert srv.server.svc.dispatcher.migrations == 1
        for p in prompts(3, seed=15):
            assert list(srv.generate(prompt=p, max_tokens=8).token_ids) == hf_greedy(p, 8)
    finally:
        srv.stop()
        ray.shutdown()
