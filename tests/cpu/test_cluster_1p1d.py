"""End to end on a local Ray: gRPC router → prefill actor → KV hand-off (direct write) → decode actor (tiny model).

The prefill worker here chunks prompts (64-token chunks, 256-token steps), so every equality below
also covers chunked prefill; tests/cpu/test_cluster_2p2d.py runs whole-prompt prefill.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import time

import grpc
import pytest
import ray

from cluster.cli import main as cli_main
from protos.pdserve.v1 import generation_pb2 as pb
from tests.cpu.harness import RunningServer, free_port, hf_greedy, prompts, tiny_config, wait_until

MAX_NEW = 24


@pytest.fixture(scope="module")
def server():
    ray.init(num_cpus=4, include_dashboard=False, namespace="pdserve-test")
    srv = RunningServer(
        tiny_config(
            prefill={"chunk_tokens": 64, "max_batch_tokens": 256}, kv_cache={"num_blocks": 2048},
            server={"metrics_port": free_port()},
        )
    )
    yield srv
    srv.stop()
    ray.shutdown()


def test_greedy_equals_hf_generate_for_22_prompts(server: RunningServer) -> None:
    ps = prompts(22, seed=1)
    lengths = []
    for p in ps:
        resp = server.generate(prompt=p, max_tokens=MAX_NEW)
        assert list(resp.token_ids) == hf_greedy(p, MAX_NEW), p
        assert resp.usage.completion_tokens == len(resp.token_ids)
        assert resp.finish_reason in ("length", "stop")
        lengths.append(resp.usage.prompt_tokens)
    assert min(lengths) == 1 and max(lengths) > 300


def test_sixteen_in_flight_each_equal_to_its_solo_run(server: RunningServer) -> None:
    ps = prompts(20, seed=2)
    solo = {p: list(server.generate(prompt=p, max_tokens=40, ignore_eos=True).token_ids) for p in ps}
    with cf.ThreadPoolExecutor(len(ps)) as ex:
        futs = {p: ex.submit(server.generate, prompt=p, max_tokens=40, ignore_eos=True) for p in ps}
        got = {p: list(f.result().token_ids) for p, f in futs.items()}
    assert got == solo
    assert solo[ps[3]] == hf_greedy(ps[3], 40, ignore_eos=True)


def test_64_concurrent_mixed_lengths_each_equal_to_hf(server: RunningServer) -> None:
    ps = prompts(64, seed=8)
    with cf.ThreadPoolExecutor(64) as ex:
        futs = [ex.submit(server.generate, prompt=p, max_tokens=20, timeout=120) for p in ps]
        got = [list(f.result().token_ids) for f in futs]
    assert got == [hf_greedy(p, 20) for p in ps]
    assert wait_until(server.all_idle)


def test_seeded_sampling_does_not_depend_on_the_batch(server: RunningServer) -> None:
    kw = dict(prompt="seeded in a crowd", max_tokens=16, temperature=0.8, top_k=40, seed=123, ignore_eos=True)
    alone = list(server.generate(**kw).token_ids)
    with cf.ThreadPoolExecutor(12) as ex:
        crowd = [ex.submit(server.generate, prompt=p, max_tokens=30, temperature=1.0, ignore_eos=True)
                 for p in prompts(11, seed=9)]
        mine = ex.submit(server.generate, **kw)
        assert list(mine.result().token_ids) == alone
        for f in crowd:
            f.result()


def test_repetition_penalty_equals_hf_generate(server: RunningServer) -> None:
    from tests.cpu.harness import _tiny

    model, tok = _tiny()
    for p in prompts(4, seed=10):
        ids = tok(p, return_tensors="pt")["input_ids"]
        ref = model.generate(ids, max_new_tokens=20, do_sample=False, repetition_penalty=1.3, pad_token_id=0)
        got = server.generate(prompt=p, max_tokens=20, repetition_penalty=1.3)
        assert list(got.token_ids) == ref[0, ids.shape[1]:].tolist()


def test_logprobs_per_token_streamed_and_unary(server: RunningServer) -> None:
    req = pb.GenerateRequest(prompt="log my probs", max_tokens=12, ignore_eos=True, logprobs=2)
    resp = server.stub.Generate(req, timeout=30)
    assert len(resp.logprobs) == len(resp.token_ids) == 12
    for tid, lp in zip(resp.token_ids, resp.logprobs):
        assert lp.token_id == tid and lp.logprob <= 0 and len(lp.top_logprobs) == 2
        assert lp.top_logprobs[0].token_id == tid  # greedy picks the top token
    streamed = [lp for m in server.stub.GenerateStream(req, timeout=30) for lp in m.logprobs]
    assert [x.token_id for x in streamed] == list(resp.token_ids)
    assert not server.generate(prompt="none", max_tokens=3).logprobs


def test_prompt_logprobs_equal_hf_on_the_first_message_only(server: RunningServer) -> None:
    import torch

    from tests.cpu.harness import _tiny

    model, tok = _tiny()
    p = "score every word of this prompt, twice: score every word of this prompt"
    server.generate(prompt=p, max_tokens=2)  # its prefix is cached now: a scored request computes it again
    ids = tok(p)["input_ids"]
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # [P, V]
    req = pb.GenerateRequest(prompt=p, max_tokens=4, prompt_logprobs=2, ignore_eos=True)
    resp = server.stub.Generate(req, timeout=30)
    assert [lp.token_id for lp in resp.prompt_logprobs] == ids[1:] and resp.usage.cached_tokens == 0
    for j, lp in enumerate(resp.prompt_logprobs):
        assert lp.logprob == pytest.approx(float(ref[j, ids[j + 1]]), abs=1e-4)
        assert [t.token_id for t in lp.top_logprobs] == torch.topk(ref[j], 2).indices.tolist()
    msgs = list(server.stub.GenerateStream(req, timeout=30))
    assert [len(m.prompt_logprobs) for m in msgs] == [len(ids) - 1] + [0] * (len(msgs) - 1)
    assert list(msgs[0].prompt_logprobs) == list(resp.prompt_logprobs)
    assert not server.generate(prompt=p, max_tokens=2).prompt_logprobs


def test_decode_never_recomputes_the_prompt(server: RunningServer) -> None:
    server.generate(prompt="count the prompt tokens", max_tokens=8)
    decode = [w for w in server.status() if w.role == "decode"]
    prefill = [w for w in server.status() if w.role == "prefill"]
    assert decode and all(w.prompt_tokens_computed == 0 for w in decode)
    assert sum(w.prompt_tokens_computed for w in prefill) > 0
    assert sum(w.tokens_generated for w in decode) > 0


def test_stream_yields_before_the_end_and_matches_unary(server: RunningServer) -> None:
    req = pb.GenerateRequest(prompt="stream me", max_tokens=600, ignore_eos=True)
    unary = server.stub.Generate(req, timeout=60)
    stream = server.stub.GenerateStream(req, timeout=60)
    first = next(stream)
    # the first message is here while the decode worker is still generating this request
    running_then = sum(w.running + w.waiting for w in server.status() if w.role == "decode")
    rest = list(stream)
    assert running_then >= 1
    msgs = [first] + rest
    assert len(msgs) > 10
    assert [t for m in msgs for t in m.token_ids] == list(unary.token_ids)
    assert "".join(m.text for m in msgs) == unary.text
    assert msgs[-1].finish_reason == "length" and all(not m.finish_reason for m in msgs[:-1])
    assert msgs[-1].usage.completion_tokens == 600


def test_timings_and_kv_bytes_are_reported(server: RunningServer) -> None:
    resp = server.generate(prompt="x" * 100, max_tokens=5, ignore_eos=True)
    t = resp.timings
    assert 0 < t.ttft_ms <= t.total_ms
    assert t.prefill_ms > 0 and t.kv_transfer_ms > 0
    # tiny model: 2 layers x (k, v) x 2 kv heads x 16 dims x 4 bytes = 512 bytes per token; the
    # hand-off writes whole 16-token blocks: 100 tokens → 7 blocks
    assert t.kv_transfer_bytes == 7 * 16 * 512


def test_one_node_hands_off_by_direct_write_and_decode_copies_nothing(server: RunningServer) -> None:
    before = ray.get(server.cluster.decodes[0].stats.remote()).extra["handoff_socket_calls"]
    server.generate(prompt="y" * 300, max_tokens=3, ignore_eos=True)
    p, d = ray.get([server.cluster.prefills[0].stats.remote(), server.cluster.decodes[0].stats.remote()])
    assert p.extra["links"] == {"decode-0": "ipc"} and d.extra["links"] == {"prefill-0": "ipc"}
    assert d.extra["kv_bytes_received"] > 0 and d.extra["kv_bytes_placed"] == 0
    # the grant and the landing came over the decode worker's control socket, not through Ray
    assert d.extra["handoff_socket_calls"] - before == 2


def test_chat_messages_use_the_chat_template(server: RunningServer) -> None:
    from engine.tiny import tiny_tokenizer

    msgs = [pb.ChatMessage(role="system", content="be brief"), pb.ChatMessage(role="user", content="hi")]
    resp = server.generate(messages=msgs, max_tokens=4)
    expected = tiny_tokenizer().apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        add_generation_prompt=True, tokenize=True,
    )["input_ids"]
    assert resp.usage.prompt_tokens == len(expected)


def test_stop_string_and_stop_token(server: RunningServer) -> None:
    full = server.generate(prompt="a stop test", max_tokens=30, ignore_eos=True)
    target = full.text[5:8]
    cut = server.generate(prompt="a stop test", max_tokens=30, ignore_eos=True, stop=[target])
    assert cut.finish_reason == "stop" and cut.stop_reason == target
    assert cut.text == full.text[: full.text.find(target)]
    tok = full.token_ids[6]
    by_id = server.generate(prompt="a stop test", max_tokens=30, ignore_eos=True, stop_token_ids=[tok])
    assert by_id.finish_reason == "stop"
    assert list(by_id.token_ids) == list(full.token_ids[: list(full.token_ids).index(tok) + 1])
    from engine.tiny import tiny_tokenizer

    before = tiny_tokenizer().decode(by_id.token_ids[:-1], skip_special_tokens=True)
    assert by_id.text == before  # the stop token's text is left out (vLLM), unless asked for:
    kept = server.generate(prompt="a stop test", max_tokens=30, ignore_eos=True, stop_token_ids=[tok],
                           include_stop_str_in_output=True)
    assert kept.text == tiny_tokenizer().decode(by_id.token_ids, skip_special_tokens=True) != before
    assert wait_until(server.all_idle)


def test_seeded_sampling_is_reproducible(server: RunningServer) -> None:
    kw = dict(prompt="sample me", max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a = server.generate(**kw)
    b = server.generate(**kw)
    c = server.generate(**{**kw, "seed": 8})
    assert list(a.token_ids) == list(b.token_ids)
    assert list(a.token_ids) != list(c.token_ids)


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt="hi", max_tokens=0), "max_tokens"),
        (dict(prompt="hi", max_tokens=-3), "max_tokens"),
        (dict(prompt="hi", max_tokens=5000), "max_tokens"),
        (dict(prompt="hi", temperature=-0.5), "temperature"),
        (dict(prompt="hi", top_p=0.0), "top_p"),
        (dict(prompt="hi", top_p=1.5), "top_p"),
        (dict(prompt="hi", top_k=-1), "top_k"),
        (dict(prompt="x" * 1600), "prompt"),
        (dict(messages=[pb.ChatMessage(role="wizard", content="hi")]), "messages[0].role"),
        (dict(prompt="hi", messages=[pb.ChatMessage(role="user", content="hi")]), "prompt"),
        (dict(prompt="hi", stop=[""]), "stop[0]"),
        (dict(prompt="hi", request_id="bad id with spaces"), "request_id"),
        (dict(prompt="hi", min_p=1.5), "min_p"),
        (dict(prompt="hi", repetition_penalty=0.0), "repetition_penalty"),
        (dict(prompt="hi", presence_penalty=3.0), "presence_penalty"),
        (dict(prompt="hi", frequency_penalty=-2.5), "frequency_penalty"),
        (dict(prompt="hi", logprobs=21), "logprobs"),
        (dict(prompt="hi", prompt_logprobs=-1), "prompt_logprobs"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(server: RunningServer, fields: dict, field: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        server.generate(**fields)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field + ":"), e.value.details()


def test_non_utf8_stop_string_is_invalid_argument(server: RunningServer) -> None:
    raw = pb.GenerateRequest(prompt="hi", stop=["ok", "zz"]).SerializeToString().replace(b"zz", b"\xff\xfe")
    call = server.channel.unary_unary("/pdserve.v1.Generation/Generate")
    with pytest.raises(grpc.RpcError) as e:
        call(raw, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("stop[1]:")


def test_undecodable_status_request_is_invalid_argument(server: RunningServer) -> None:
    call = server.channel.unary_unary("/pdserve.v1.Generation/Status")
    with pytest.raises(grpc.RpcError) as e:
        call(b"\xff\xff\xff\xff", timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("request:")


def test_a_duplicate_in_flight_request_id_is_already_exists_at_once(server: RunningServer) -> None:
    first = server.stub.GenerateStream(
        pb.GenerateRequest(prompt="dup", request_id="dup-a", max_tokens=400, ignore_eos=True), timeout=60
    )
    next(first)  # in flight
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        server.generate(prompt="dup again", request_id="dup-a", max_tokens=4)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and time.monotonic() - t0 < 5
    rest = list(first)  # the first is untouched
    assert rest[-1].finish_reason == "length" and sum(len(m.token_ids) for m in rest) == 399
    assert wait_until(server.all_idle, timeout=15)


def test_reusing_an_id_right_after_its_cancel_gets_its_own_tokens(server: RunningServer) -> None:
    for i in range(3):
        stream = server.stub.GenerateStream(
            pb.GenerateRequest(prompt="a long one " * 20, request_id="reuse", max_tokens=500, ignore_eos=True),
            timeout=60,
        )
        next(stream)
        stream.cancel()
        p = prompts(3, seed=20 + i)[1]
        resp = server.generate(prompt=p, request_id="reuse", max_tokens=8)  # at once, same id
        assert list(resp.token_ids) == hf_greedy(p, 8) and resp.request_id == "reuse"
    assert wait_until(server.all_idle, timeout=15)


def test_extreme_sampling_values_never_fail_the_requests_batched_with_them(server: RunningServer) -> None:
    ps = prompts(8, seed=31)
    bad = [dict(temperature=1e-40), dict(temperature=3e38, top_k=3), dict(temperature=1e-30, top_p=0.1, seed=5)]
    with cf.ThreadPoolExecutor(len(ps) + len(bad)) as ex:
        normal = [ex.submit(server.generate, prompt=p, max_tokens=12) for p in ps]
        odd = [ex.submit(server.generate, prompt="odd one", max_tokens=12, **b) for b in bad]
        outs = [f.result() for f in normal]
        assert all(len(f.result().token_ids) >= 1 for f in odd)
    for p, o in zip(ps, outs):
        assert list(o.token_ids) == hf_greedy(p, 12)


def test_client_cancel_frees_kv_on_every_worker(server: RunningServer) -> None:
    stream = server.stub.GenerateStream(
        pb.GenerateRequest(prompt="cancel me", max_tokens=1000, ignore_eos=True), timeout=60
    )
    next(stream)
    next(stream)
    assert any(w.kv_blocks_used > 0 for w in server.status() if w.role == "decode")
    stream.cancel()
    assert wait_until(server.all_idle, timeout=15)


def test_deadline_cancels_and_frees_kv(server: RunningServer) -> None:
    with pytest.raises(grpc.RpcError) as e:
        server.generate(prompt="slow", max_tokens=1000, ignore_eos=True, timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(server.all_idle, timeout=15)


def test_status_cli_json(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["status", "--address", server.address, "--json"]) == 0
    workers = json.loads(capsys.readouterr().out)["workers"]
    assert sorted(w["role"] for w in workers) == ["decode", "prefill"]
    for w in workers:
        for key in ("id", "node", "running", "waiting", "kv_blocks_used", "kv_blocks_total",
                    "prompt_tokens_computed", "tokens_generated", "kv_blocks_cached", "prefix_hit_tokens",
                    "requests_prefilled"):
            assert key in w
    prefill = next(w for w in workers if w["role"] == "prefill")
    assert prefill["requests_prefilled"] == prefill["tokens_generated"] > 0
    assert next(w for w in workers if w["role"] == "decode")["kv_blocks_total"] == 2048


def test_generate_cli(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["generate", "hello", "--raw", "--max-tokens", "5", "--address", server.address, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finish_reason"] in ("length", "stop") and len(out["token_ids"]) <= 5
    for held, ok in ((["--choice", "alpha", "--choice", "beta"], lambda t: t in ("alpha", "beta")),
                     (["--regex", "[xyz]{4}"], lambda t: len(t) == 4 and set(t) <= set("xyz")),
                     (["--json-schema", '{"type": "object", "properties": {"ok": {"type": "boolean"}}, '
                                        '"required": ["ok"], "additionalProperties": false}'],
                      lambda t: isinstance(json.loads(t)["ok"], bool))):
        assert cli_main(["generate", "hello", "--max-tokens", "40", "--address", server.address, "--json", *held]) == 0
        out = json.loads(capsys.readouterr().out)
        assert ok(out["text"]) and out["finish_reason"] == "stop", (held, out["text"])


def test_health_and_reflection(server: RunningServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    h = health_pb2_grpc.HealthStub(server.channel)
    assert h.Check(health_pb2.HealthCheckRequest(service="pdserve.v1.Generation"), timeout=5).status == 1
    r = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    resp = next(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {s.name for s in resp.list_services_response.service}
    assert "pdserve.v1.Generation" in names


def test_everything_is_free_after_the_workload(server: RunningServer) -> None:
    assert wait_until(server.all_idle, timeout=15)
    for w in server.status():
        assert w.kv_blocks_used == 0 and w.running == 0 and w.waiting == 0
    time.sleep(0)


def _scrape(server: RunningServer) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.cfg.server.metrics_port}/metrics", timeout=10).read()
    out = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _fresh_scrape(server: RunningServer) -> dict[str, float]:
    """A scrape whose worker gauges (pulled every 2 s) have caught up with the workers."""
    live = next(w.prompt_tokens_computed for w in server.status() if w.id == "prefill-0")
    key = 'pdserve_worker_prompt_tokens_computed{role="prefill",worker="prefill-0"}'
    assert wait_until(lambda: _scrape(server).get(key) == live, timeout=10)
    return _scrape(server)


def test_metrics_endpoint_counts_requests(server: RunningServer) -> None:
    before = _fresh_scrape(server)
    prompt = "measure me: the metrics test's prompt, 52 bytes long"  # 3 whole blocks + 4 tokens
    assert len(prompt) == 52
    cached = [server.generate(prompt=prompt, max_tokens=6, ignore_eos=True).usage.cached_tokens for _ in range(3)]
    assert cached == [0, 48, 48]  # the client is told what was reused
    with pytest.raises(grpc.RpcError):
        server.generate(prompt="", max_tokens=6)
    after = _scrape(server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("pdserve_ttft_seconds_count") == 3
    assert delta("pdserve_e2e_seconds_count") == 3
    assert delta("pdserve_kv_transfer_seconds_count") == 3
    assert delta("pdserve_kv_transfer_bytes_sum") > 0
    assert delta("pdserve_tpot_seconds_count") == 3
    assert delta("pdserve_itl_seconds_count") == 3 * 5
    assert delta('pdserve_requests_total{finish_reason="length"}') == 3
    assert delta("pdserve_generation_tokens_total") == 18
    assert delta('pdserve_errors_total{code="INVALID_ARGUMENT"}') == 1
    free = 'pdserve_worker_kv_blocks_free{role="decode",worker="decode-0"}'
    assert wait_until(lambda: _scrape(server).get(free) == 2048, timeout=10)  # pulled every 2 s
    hits = 'pdserve_worker_prefix_cache_hit_tokens{role="prefill",worker="prefill-0"}'
    queried = 'pdserve_worker_prefix_cache_query_tokens{role="prefill",worker="prefill-0"}'
    # the 2nd and 3rd found the 1st's 3 whole blocks (the one with the last token is always computed)
    assert wait_until(lambda: _scrape(server).get(hits, 0) - before.get(hits, 0) == 2 * 48, timeout=10)
    assert _scrape(server)[queried] - before.get(queried, 0) == 3 * 52
    # ...and so did their reservations on the decode worker (those blocks were not handed off again)
    d_hits = 'pdserve_worker_prefix_cache_hit_tokens{role="decode",worker="decode-0"}'
    assert _scrape(server)[d_hits] - before.get(d_hits, 0) == 2 * 48
    assert _scrape(server)['pdserve_worker_kv_blocks_cached{role="decode",worker="decode-0"}'] >= 3


def test_a_cache_salt_keeps_tenants_prefixes_apart(server: RunningServer) -> None:
    prompt = "cache salt test: forty bytes of prompt.."  # 2 whole blocks + 8 tokens
    assert len(prompt) == 40
    got = [server.generate(prompt=prompt, max_tokens=2, cache_salt=s).usage.cached_tokens
           for s in ("", "tenant-a", "tenant-a", "tenant-b", "")]
    assert got == [0, 0, 32, 0, 32]
    with pytest.raises(grpc.RpcError) as e:
        server.generate(prompt=prompt, max_tokens=2, cache_salt="x" * 257)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in e.value.details()


def test_bench_command_against_the_server(server: RunningServer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run.json"
    argv = ["bench", "--address", server.address, "--tokenizer", "tiny", "--workload", "fixed", "--input-len", "40",
            "--output-len", "8", "--num-prompts", "6", "--rate", "20,inf", "--slo", "ttft:10000", "tpot:1000",
            "--output", str(out), "--plot", str(tmp_path / "run.png"), "--quiet"]
    assert cli_main(argv) == 0
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2
    for r in runs:
        assert r["completed"] == 6 and r["failed"] == 0 and r["total_output_tokens"] == 48
        assert r["goodput"] > 0 and r["p99_ttft_ms"] >= r["median_ttft_ms"] > 0
    assert (tmp_path / "run.png").stat().st_size > 10_000


def test_bench_max_tokens_asks_for_more_and_closes_each_stream_at_its_answer(server: RunningServer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "cap.json"
    generated = lambda: sum(w.tokens_generated for w in server.status() if w.role == "decode")  # noqa: E731
    before = generated()
    argv = ["bench", "--address", server.address, "--tokenizer", "tiny", "--workload", "fixed", "--input-len", "40",
            "--output-len", "8", "--max-tokens", "1000", "--num-prompts", "4", "--rate", "inf", "--output", str(out),
            "--quiet"]
    assert cli_main(argv) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["completed"] == 4 and run["total_output_tokens"] == 4 * 8
    assert wait_until(server.all_idle, timeout=10)
    assert generated() - before < 4 * 200  # the streams were closed, the requests ended: not 4 x 1000
