"""Router pieces without workers: validation, UTF-8 field finding, detokenizer, stop strings, policy."""
from __future__ import annotations

import pytest
from google.protobuf import struct_pb2

from engine.tiny import tiny_tokenizer
from protos.pdserve.v1 import generation_pb2 as pb
from router.config import LimitsConfig
from router.detokenizer import IncrementalDetokenizer, StopMatcher, text_decoder
from router.policy import LeastLoadedPolicy
from router.prefix_affinity import PrefixAffinity
from router.validation import InvalidArgument, parse, validate

TOK = tiny_tokenizer()
LIMITS = LimitsConfig(max_prompt_tokens=100, max_new_tokens=50, default_max_tokens=20)


def _v(**kw):  # type: ignore[no-untyped-def]
    return validate(pb.GenerateRequest(**kw), TOK, LIMITS, max_model_len=120)


def test_valid_request_defaults() -> None:
    r = _v(prompt="hello")
    assert r.prompt_ids == TOK("hello")["input_ids"]
    assert r.sampling.max_tokens == 20 and r.sampling.greedy and r.sampling.top_p == 1.0
    assert len(r.request_id) == 32
    assert _v(prompt="x" * 95).sampling.max_tokens == 20
    short_ctx = validate(pb.GenerateRequest(prompt="x" * 95), TOK, LIMITS, max_model_len=105)
    assert short_ctx.sampling.max_tokens == 10  # default clipped to the context left


def test_logit_bias_reaches_the_sampling_params_in_token_order() -> None:
    assert _v(prompt="hi", logit_bias={9: -100.0, 3: 2.5}).sampling.logit_bias == ((3, 2.5), (9, -100.0))
    assert _v(prompt="hi").sampling.logit_bias == ()


def test_priority_reaches_the_sampling_params_from_grpc_and_http() -> None:
    import json

    from router.errors import BadRequest
    from router.openai_requests import parse_body

    assert _v(prompt="hi", priority=-7).sampling.priority == -7 and _v(prompt="hi").sampling.priority == 0

    def http(**fields):  # type: ignore[no-untyped-def]
        return parse_body(json.dumps({"model": "m", "prompt": "hi", **fields}).encode(), False, "m", 8)[0][0]

    assert http(priority=3).priority == 3 and http().priority == 0
    for bad in ("high", 1.5, True, 2**31):
        with pytest.raises(BadRequest) as e:
            http(priority=bad)
        assert e.value.param == "priority"


def test_given_request_id_is_kept() -> None:
    assert _v(prompt="hi", request_id="job-7:a").request_id == "job-7:a"


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(prompt="x" * 101), "prompt"),
        (dict(prompt="x" * 90, max_tokens=40), "max_tokens"),
        (dict(prompt="hi", max_tokens=51), "max_tokens"),
        (dict(prompt="hi", temperature=float("nan")), "temperature"),
        (dict(prompt="hi", stop_token_ids=[100000]), "stop_token_ids[0]"),
        (dict(prompt="hi", allowed_token_ids=[5, 100000]), "allowed_token_ids[1]"),
        (dict(prompt="hi", stop=["a"] * 17), "stop"),
        (dict(prompt="hi", logit_bias={100000: 1.0}), "logit_bias[100000]"),
        (dict(prompt="hi", max_tokens=5, min_tokens=6), "min_tokens"),
        (dict(prompt="hi", min_tokens=-1), "min_tokens"),
        (dict(prompt="hi", logit_bias={5: 101.0}), "logit_bias[5]"),
        (dict(prompt="hi", logit_bias={5: float("nan")}), "logit_bias[5]"),
        (dict(prompt="hi", logit_bias={i: 1.0 for i in range(301)}), "logit_bias"),
        (dict(messages=[pb.ChatMessage(role="user", content="a"), pb.ChatMessage(role="bot", content="b")]),
         "messages[1].role"),
    ],
)
def test_invalid_names_field(kw: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        _v(**kw)
    assert e.value.field == field


def test_a_chat_template_that_refuses_the_messages_is_a_bad_request_naming_them() -> None:
    """Real checkpoints' templates raise on what they do not take (Llama 2, Mistral, Gemma: "roles
    must alternate"); that used to escape validation as an unexpected error (gRPC UNKNOWN, HTTP 500)."""
    tok = tiny_tokenizer()
    tok.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with "
                         "the user') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    req = pb.GenerateRequest(messages=[pb.ChatMessage(role="system", content="be brief")])
    with pytest.raises(InvalidArgument) as e:
        validate(req, tok, LIMITS, max_model_len=120)
    assert e.value.field == "messages" and "Conversation must start with the user" in str(e.value)


def _chat(*msgs: tuple[str, str], **kw):  # type: ignore[no-untyped-def]
    return _v(messages=[pb.ChatMessage(role=r, content=c) for r, c in msgs], **kw)


def test_the_chat_template_opens_the_answer_or_continues_the_last_message_as_asked() -> None:
    user = ("user", "hi")
    assert TOK.decode(_chat(user).prompt_ids).endswith("<|im_start|>assistant\n")  # default: a new turn
    assert TOK.decode(_chat(user, add_generation_prompt=False).prompt_ids).endswith("hi<|im_end|>\n")
    cont = _chat(user, ("assistant", "The answer is"), continue_final_message=True).prompt_ids
    assert TOK.decode(cont).endswith("<|im_start|>assistant\nThe answer is")  # left open
    with pytest.raises(InvalidArgument) as e:
        _chat(user, ("assistant", "x"), continue_final_message=True, add_generation_prompt=True)
    assert e.value.field == "continue_final_message"


def test_chat_template_kwargs_reach_the_template_but_not_its_own_arguments() -> None:
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if enable_thinking %}<think>{% endif %}{% for i in range(n) %}!{% endfor %}")
    kw = struct_pb2.Struct()
    kw.update({"enable_thinking": True, "n": 3})  # a Struct's numbers are floats: range() needs 3, not 3.0
    req = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="q")], chat_template_kwargs=kw)
    assert tok.decode(validate(req, tok, LIMITS, max_model_len=120).prompt_ids) == "q<think>!!!"
    for own in ("chat_template", "tokenize", "messages", "add_generation_prompt"):
        bad = struct_pb2.Struct()
        bad.update({own: "{{ 'x' }}"})
        with pytest.raises(InvalidArgument) as e:
            validate(pb.GenerateRequest(messages=req.messages, chat_template_kwargs=bad), tok, LIMITS, 120)
        assert e.value.field == f"chat_template_kwargs.{own}"


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens() -> None:
    ids = TOK("abcdefgh")["input_ids"]
    assert _v(prompt="abcdefgh", truncate_prompt_tokens=3).prompt_ids == ids[-3:]
    assert _v(prompt="abcdefgh", truncate_prompt_tokens=30).prompt_ids == ids
    long = _v(prompt="x" * 200, max_tokens=30, truncate_prompt_tokens=-1)  # as many as fit: 120 - 30, limit 100
    assert len(long.prompt_ids) == 90 and long.sampling.max_tokens == 30
    assert len(_v(prompt="x" * 200, truncate_prompt_tokens=-1).prompt_ids) == 100  # default 20 leaves 100
    with pytest.raises(InvalidArgument) as e:
        _v(prompt="hi", truncate_prompt_tokens=0)
    assert e.value.field == "truncate_prompt_tokens"


@pytest.mark.parametrize(
    "msg, field",
    [
        (pb.GenerateRequest(prompt="zz"), "prompt"),
        (pb.GenerateRequest(prompt="ok", request_id="zz"), "request_id"),
        (pb.GenerateRequest(prompt="ok", stop=["a", "b", "zz"]), "stop[2]"),
        (pb.GenerateRequest(prompt="ok", bad_words=["a", "zz"]), "bad_words[1]"),
        (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="ok"),
                                      pb.ChatMessage(role="user", content="zz")]), "messages[1].content"),
    ],
)
def test_bad_utf8_is_located(msg: pb.GenerateRequest, field: str) -> None:
    raw = msg.SerializeToString().replace(b"zz", b"\xc3\x28")
    with pytest.raises(InvalidArgument) as e:
        parse(raw)
    assert e.value.field == field


def test_garbage_bytes_are_invalid_not_a_crash() -> None:
    with pytest.raises(InvalidArgument):
        parse(b"\xff\xff\xff\xff")


def test_incremental_detokenizer_equals_full_decode_on_multibyte_text() -> None:
    text = "naïve café — 東京 ✓ done"
    ids = TOK(text)["input_ids"]
    d = IncrementalDetokenizer(TOK)
    pieces = [d.add([i]) for i in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_text_decoder_gives_what_the_tokenizer_decode_gives(which: str) -> None:
    """The detokenizer's direct call into the Rust tokenizer: the same text as transformers' decode,
    special tokens skipped, partial characters included, for every window the detokenizer decodes."""
    import random

    from engine.config import ModelConfig
    from engine.model_loader import load_tokenizer

    tok = TOK if which == "tiny" else load_tokenizer(ModelConfig(path="default"))
    decode = text_decoder(tok)
    ids = tok("<|im_start|>user\nnaïve café — 東京 ✓ 😀 done.<|im_end|>\n  spaces  and tabs\t!")["input_ids"]
    rng = random.Random(0)
    ids += [rng.randrange(len(tok)) for _ in range(200)]  # any token, special ones included
    for a in range(0, len(ids), 7):
        for b in (a, a + 1, a + 2, a + 9, len(ids)):
            assert decode(ids[a:b]) == tok.decode(ids[a:b], skip_special_tokens=True)


def test_text_decoder_lets_transformers_clean_up_spaces_when_the_tokenizer_asks() -> None:
    class CleaningUp:
        clean_up_tokenization_spaces = True
        backend_tokenizer = TOK.backend_tokenizer

        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return "cleaned"

    assert text_decoder(CleaningUp())([5, 6]) == "cleaned"


def test_stop_string_split_across_deltas() -> None:
    m = StopMatcher(("STOP",))
    out = m.add("hello S") + m.add("TO") + m.add("P and more")
    assert m.matched == "STOP" and out + m.flush() == "hello "


def test_stop_string_kept_in_the_text_when_asked() -> None:
    m = StopMatcher(("STOP", "ST"), include=True)
    out = m.add("hello S") + m.add("TO") + m.add("P and more")
    assert m.matched == "ST" and out + m.flush() == "hello ST"  # the earliest match, ending the text


def test_detokenizer_keeps_special_tokens_text_when_asked() -> None:
    ids = TOK("hi<|im_end|> there")["input_ids"]
    skipped = IncrementalDetokenizer(TOK)
    assert skipped.add(ids) + skipped.flush() == TOK.decode(ids, skip_special_tokens=True)
    d = IncrementalDetokenizer(TOK, skip_special_tokens=False)
    text = "".join([d.add([i]) for i in ids] + [d.flush()])
    assert text == TOK.decode(ids) and "<|im_end|>" in text


def test_stop_matcher_releases_all_text_without_a_match() -> None:
    m = StopMatcher(("xyz",))
    out = m.add("abc") + m.add("xy") + m.add("w")
    assert m.matched is None and out + m.flush() == "abcxyw"


def test_earliest_stop_string_wins() -> None:
    m = StopMatcher(("bb", "a"))
    assert m.add("xxbba") == "xxbb"[:2] and m.matched == "bb"


def test_no_stop_string_starts_in_the_text_of_the_first_min_tokens() -> None:
    m = StopMatcher(("ab",))
    assert m.add("xab", armed=False) == "xab" and m.matched is None  # all released at once
    assert m.add("a", armed=False) == "a"
    assert m.add("b") == "" and m.matched is None  # "ab" would start in the quiet text
    assert m.add("cab") == "bc" and m.matched == "ab"  # the held "b", then up to the match


def test_policy_prefers_least_loaded() -> None:
    p = LeastLoadedPolicy(num_prefill=2, num_decode=3)
    p.add(p.decode[0], 100)
    p.add(p.decode[2], 10)
    assert p.decode_order() == [1, 2, 0]
    p.add(p.prefill[0], 500)
    assert p.pick_prefill() == (1, 0)
    p.remove(p.prefill[0], 500)
    assert p.pick_prefill(prompt=[1, 2, 3]) == (0, 3)
    assert p.pick_prefill(exclude={0}) == (1, 0)  # a dead worker is skipped even when it is idlest
    assert p.pick_prefill(exclude={0, 1}) is None


def test_a_prompt_goes_where_its_prefix_was_sent_unless_that_costs_more_than_it_saves() -> None:
    p = LeastLoadedPolicy(num_prefill=2, num_decode=1, affinity=PrefixAffinity(block_size=16))
    system = list(range(100, 164))  # 4 blocks
    p.add(p.prefill[0], 40)
    assert p.pick_prefill(prompt=system + [1, 2, 3]) == (1, 67)  # nobody holds it: the idler one
    p.add(p.prefill[1], 60)  # worker 1 (holding the 64-token prefix) has more queued now
    assert p.pick_prefill(prompt=system + [4, 5]) == (1, 2)  # 60 + 66 - 64 < 40 + 66: it computes 2
    assert p.pick_prefill(prompt=[7] + system) == (0, 65)  # same tokens, other start: no prefix shared
    p.add(p.prefill[1], 100)
    assert p.pick_prefill(prompt=system + [6]) == (0, 65)  # 160 queued there outweighs the 64 saved
    # ...and worker 0 now holds it: the record follows the last pick
    assert p.affinity is not None and p.affinity.holder(p.affinity.digests(system + [6])) == (0, 64)
    assert p.pick_prefill(exclude={0}, prompt=system + [6]) == (1, 65)  # a dead holder is skipped


def test_a_reservation_goes_to_the_worker_holding_the_prefix_unless_it_is_much_busier() -> None:
    """Decode and aggregated workers alike (decode_affinity: its own record, not the prefill side's)."""
    p = LeastLoadedPolicy(num_prefill=2, num_decode=2, decode_affinity=PrefixAffinity(block_size=16))
    system = list(range(100, 164))  # 4 blocks
    p.add(p.decode[0], 10)
    assert p.decode_order(system + [1]) == [1, 0]  # nobody holds it: the idler one
    p.placed(system + [1], "", 1)
    p.add(p.decode[1], 50)
    assert p.decode_order(system + [2]) == [1, 0]  # 50 - 64 < 10: its prefix is there
    assert p.decode_order(system + [2], salt="other") == [0, 1]  # another salt shares nothing
    assert p.decode_order() == [0, 1]  # no prompt (a moved request): room only
    p.add(p.decode[1], 100)
    assert p.decode_order(system + [2]) == [0, 1]  # 150 - 64 > 10
    assert p.pick_prefill(prompt=system + [2]) == (0, 65)  # the prefill side has no record of it


def test_prefill_and_decode_affinity_are_kept_apart() -> None:
    p = LeastLoadedPolicy(num_prefill=2, num_decode=2, affinity=PrefixAffinity(16), decode_affinity=PrefixAffinity(16))
    system = list(range(100, 164))
    assert p.pick_prefill(prompt=system + [1]) == (0, 65)
    p.placed(system + [1], "", 1)
    p.add(p.prefill[0], 30)
    p.add(p.decode[1], 30)
    assert p.pick_prefill(prompt=system + [2]) == (0, 1) and p.decode_order(system + [2]) == [1, 0]


def test_affinity_forgets_the_least_recently_used_prefixes() -> None:
    a = PrefixAffinity(block_size=2, capacity=4)
    a.record(a.digests([1, 2, 3, 4, 5]), 0)  # 2 digests
    a.record(a.digests([9, 9, 9, 9, 9]), 1)  # 2 more
    a.record(a.digests([1, 2, 7]), 0)  # touches [1, 2]
    a.record(a.digests([5, 5, 5]), 1)  # evicts the oldest: [1 2 3 4]'s second digest
    assert a.holder(a.digests([1, 2, 3, 4, 5])) == (0, 2)
    assert a.holder(a.digests([8, 8, 8])) == (None, 0)


def test_every_metric_the_grafana_dashboard_plots_is_one_the_router_exports() -> None:
    import json
    import re
    from pathlib import Path

    from router.metrics import RouterMetrics

    dash = json.loads((Path(__file__).resolve().parents[2] / "deploy/grafana/pdserve-dashboard.json").read_text())
    plotted = {re.sub(r"_bucket$", "", m) for p in dash["panels"] for t in p.get("targets", [])
               for m in re.findall(r"pdserve_[a-z0-9_]+", t["expr"])}
    families = list(RouterMetrics().registry.collect())  # a labelled family has no sample until used
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    assert len(plotted) > 20 and plotted <= exported, plotted - exported


def test_worker_loop_time_is_exported_per_part() -> None:
    from engine.types import WorkerStats
    from router.metrics import RouterMetrics

    m = RouterMetrics()
    loop = {"idle": 1.5, "schedule": 0.25, "run": 4.0, "postprocess": 0.5}
    m.set_workers([WorkerStats("decode", "decode-0", "n", 1, 0, 2, 10, 0, 9, {"steps": 40, "loop_s": loop}),
                   WorkerStats("prefill", "prefill-0", "n", 0, 0, 0, 10, 5, 1, {})])  # e.g. a lost one's
    lab = {"role": "decode", "worker": "decode-0"}
    assert m.registry.get_sample_value("pdserve_worker_steps", lab) == 40
    assert {part: m.registry.get_sample_value("pdserve_worker_loop_seconds", {**lab, "part": part})
            for part in loop} == loop
    assert m.registry.get_sample_value("pdserve_worker_steps", {"role": "prefill", "worker": "prefill-0"}) is None


def test_event_inbox_merges_waiting_events_and_keeps_one_deadline_timer() -> None:
    import asyncio
    import time

    from engine.types import DecodeEvent, FinishReason
    from router.errors import DeadlineExceeded
    from router.event_inbox import EventInbox

    async def run() -> None:
        loop = asyncio.get_running_loop()
        inbox = EventInbox()
        deadline = time.monotonic() + 0.3
        loop.call_soon(inbox.put, DecodeEvent("r", [5]))
        assert (await inbox.take(deadline)).token_ids == [5]  # waited for it
        timer = inbox._timer
        assert timer is not None and not timer.cancelled()
        for t, end in ((6, None), (7, FinishReason.LENGTH), (8, None)):
            inbox.put(DecodeEvent("r", [t], end))
        merged = await inbox.take(deadline)  # what was waiting, up to the one that ends it
        assert merged.token_ids == [6, 7] and merged.finish_reason is FinishReason.LENGTH
        assert (await inbox.take(deadline)).token_ids == [8]
        with pytest.raises(DeadlineExceeded):  # the same timer wakes the wait at the deadline
            await inbox.take(deadline)
        assert time.monotonic() >= deadline and inbox._timer is timer
        inbox.close()
        assert timer.cancelled() and inbox._timer is None

    asyncio.run(run())


def test_bad_words_become_token_sequences_as_given_and_after_a_space() -> None:
    tok = tiny_tokenizer()  # one token a byte: " ab" is three
    sp = _v(prompt="hi", bad_words=["ab", " c"]).sampling
    assert sp.bad_words == (tuple(tok.encode("ab")), tuple(tok.encode(" ab")), tuple(tok.encode(" c")))
    for words, field in [(["ok", " "], "bad_words[1]"), (["x"] * 65, "bad_words"), (["y" * 65], "bad_words[0]")]:
        with pytest.raises(InvalidArgument) as e:
            _v(prompt="hi", bad_words=words)
        assert e.value.field == field
