"""Structured outputs without workers: the grammar's mask in the sampler, a Guide's replay, the
router's checks and the HTTP fields that carry them (end to end: test_http_api.py)."""
from __future__ import annotations

import json

import pytest
import torch

from engine.sampler import sample
from engine.structured import Guide, Guides, grammar_text
from engine.tiny import tiny_model, tiny_tokenizer
from engine.types import SamplingParams
from protos.pdserve.v1 import generation_pb2 as pb
from router.config import LimitsConfig
from router.errors import BadRequest
from router.openai_requests import parse_body
from router.validation import InvalidArgument, validate
from tests.cpu.harness import wait_until

TOK = tiny_tokenizer()
V = 259
SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["color", "ok", "n"], "additionalProperties": False}


def _guides() -> Guides:
    return Guides(tiny_tokenizer, V)


def _generate(params: SamplingParams, guide: Guide | None, prompt: str = "hello", steps: int = 80) -> list[int]:
    """The tiny model's answer token by token, `guide` following it as a worker's does (None: free)."""
    model, ids, out = tiny_model(), TOK(prompt)["input_ids"], []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids + out])).logits[0, -1:]
        out.append(sample(logits, [params], [len(ids) + len(out)], guides=[guide])[0][0])
        if guide is not None:
            guide.follow(out)
            if guide.complete:
                break
        if out[-1] == 2:  # EOS
            break
    return out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_schema_guided_answer_is_json_the_schema_accepts(temperature: float) -> None:
    grammar = grammar_text("json_schema", json.dumps(SCHEMA))
    params = SamplingParams(temperature=temperature, seed=3, grammar=grammar)
    out = _generate(params, _guides().new(grammar))
    doc = json.loads(TOK.decode(out))
    assert set(doc) == {"color", "ok", "n"} and doc["color"] in ("red", "green") and isinstance(doc["ok"], bool)
    assert 0 <= doc["n"] <= 99
    free = _generate(SamplingParams(temperature=temperature, seed=3), None, steps=len(out))
    assert free != out  # the tiny random model does not write JSON by itself: the mask did it


def test_the_mask_touches_only_its_row_and_leaves_what_the_grammar_allows() -> None:
    x = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    guide = _guides().new(grammar_text("choice", ["yes", "no"]))
    tokens, _ = sample(x, [SamplingParams(), SamplingParams(), SamplingParams(temperature=2.0, seed=1)], [0, 0, 0],
                       guides=[None, guide, None])
    assert tokens[0] == int(x[0].argmax())  # rows without a guide unchanged
    yes, no = TOK("y")["input_ids"][0], TOK("n")["input_ids"][0]
    assert tokens[1] == (yes if x[1, yes] > x[1, no] else no)  # the better of the two first letters
    drawn = {sample(x[1:2], [SamplingParams(temperature=5.0, seed=s)], [0], guides=[guide])[0][0] for s in range(40)}
    assert drawn == {yes, no}  # drawn rows too: only what the grammar allows, both of it


def test_a_guide_is_a_function_of_the_tokens_it_followed() -> None:
    """A moved or preempted request's Guide replays its output at once: the same place as one that
    followed it step by step (the next masks agree, and it completes at the same token)."""
    grammar = grammar_text("regex", r"(ab|cd)+!")
    guides = _guides()
    out = TOK("abcdab!")["input_ids"]
    stepwise, replayed = guides.new(grammar), guides.new(grammar)
    x = torch.zeros(1, V)
    for i in range(1, len(out)):
        stepwise.follow(out[:i])
        replayed_now = guides.new(grammar)
        replayed_now.follow(out[:i])
        a = sample(x, [SamplingParams(logprobs=0)], [0], guides=[stepwise])[1][0]
        b = sample(x, [SamplingParams(logprobs=0)], [0], guides=[replayed_now])[1][0]
        assert a is not None and b is not None and a.token_id == b.token_id
        assert not stepwise.complete
    replayed.follow(out)
    stepwise.follow(out)
    assert replayed.complete and stepwise.complete and not replayed.error


def test_a_token_the_grammar_refuses_ends_it_in_error() -> None:
    guide = _guides().new(grammar_text("choice", ["yes"]))
    guide.follow(TOK("x")["input_ids"])
    assert guide.complete and guide.error


def test_a_guide_that_starts_after_a_text_leaves_the_answer_free_until_it() -> None:
    """grammar_after (a reasoning model's "</think>"): the row samples as an unguided one until the
    text is written (over 8 tokens here, one a byte), then the grammar holds the rest; a replay finds
    the same place, and only the first appearance counts."""
    guides, grammar = _guides(), grammar_text("choice", ["yes", "no"])
    x = torch.randn(1, V, generator=torch.Generator().manual_seed(1))
    yes, no = TOK("y")["input_ids"][0], TOK("n")["input_ids"][0]
    assert int(x[0].argmax()) not in (yes, no)
    thinking = TOK("so: </thin k> </think>")["input_ids"]
    guide = guides.new(grammar, after="</think>")
    for i in range(len(thinking)):  # "</thin k>" is not it
        guide.follow(thinking[:i])
        assert not guide.active and not guide.complete
        assert sample(x, [SamplingParams()], [0], guides=[guide])[0] == [int(x[0].argmax())]  # free
    guide.follow(thinking)
    assert guide.active and guide.start == len(thinking)
    assert sample(x, [SamplingParams()], [0], guides=[guide])[0][0] in (yes, no)
    guide.follow(thinking + TOK("yes")["input_ids"])
    assert guide.complete and not guide.error
    replayed = guides.new(grammar, after="</think>")
    replayed.follow(thinking + TOK("yes")["input_ids"])
    assert replayed.start == len(thinking) and replayed.complete and not replayed.error
    twice = guides.new(grammar, after="</think>")
    twice.follow(TOK("</think></think>")["input_ids"])  # the grammar took the second: refused
    assert twice.start == 8 and twice.complete and twice.error


def _thinking_tokenizer():  # type: ignore[no-untyped-def]
    """The tiny tokenizer with Qwen 3's markers as single tokens: <think> = V, </think> = V + 1."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    return tok


def test_the_text_a_guide_waits_for_may_be_one_special_token() -> None:
    """As Qwen 3's and DeepSeek R1's "</think>": one added token, found by its text."""
    tok = _thinking_tokenizer()
    guide = Guides(lambda: tok, V + 2).new(grammar_text("choice", ["yes", "no"]), after="</think>")
    ids = tok("hm</think>")["input_ids"]
    assert ids[-1] == V + 1  # the special token
    guide.follow(ids[:-1])
    assert not guide.active
    guide.follow(ids + tok("no")["input_ids"])
    assert guide.start == len(ids) and guide.complete and not guide.error


def test_a_free_opener_may_be_the_first_token_or_the_grammar_holds_the_answer_at_once() -> None:
    """grammar_free_opener "<think>" (one token): the first token is the grammar's or <think>; after
    <think>, free until </think>; without it, the grammar holds from the first token."""
    tok = _thinking_tokenizer()
    guides, grammar = Guides(lambda: tok, V + 2), grammar_text("choice", ["yes", "no"])
    yes, no, think = tok("y")["input_ids"][0], tok("n")["input_ids"][0], V
    x = torch.zeros(1, V + 2)
    x[0, 77] = 9.0  # the model's favourite, which the grammar refuses
    first = guides.new(grammar, "</think>", "<think>")
    assert first.active and first.opening
    assert sample(x, [SamplingParams()], [0], guides=[first])[0][0] in (yes, no)
    x[0, think] = 5.0
    assert sample(x, [SamplingParams()], [0], guides=[first])[0][0] == think  # or <think>, its next best
    drawn = {sample(x, [SamplingParams(temperature=3.0, seed=s)], [0], guides=[first])[0][0] for s in range(60)}
    assert drawn == {yes, no, think}
    thinking = [think] + tok("hm, 77")["input_ids"]
    first.follow(thinking)
    assert not first.active and not first.opening
    assert sample(x, [SamplingParams()], [0], guides=[first])[0][0] == 77  # free
    first.follow(thinking + [V + 1] + tok("yes")["input_ids"])
    assert first.start == len(thinking) + 1 and first.complete and not first.error
    at_once = guides.new(grammar, "</think>", "<think>")
    at_once.follow(tok("no")["input_ids"])
    assert at_once.start == 0 and at_once.complete and not at_once.error
    assert guides.prepare(grammar, "<thinking>") and not guides.prepare(grammar, "<think>")
    with pytest.raises(ValueError):
        guides.new(grammar, "</think>", "<th")


LIMITS = LimitsConfig(max_prompt_tokens=100, max_new_tokens=50, default_max_tokens=20)


def _v(**structured):  # type: ignore[no-untyped-def]
    return validate(pb.GenerateRequest(prompt="hi", structured=pb.StructuredOutput(**structured)), TOK, LIMITS, 120)


@pytest.mark.parametrize("structured, field", [
    (dict(json_schema='{"type": "nonsense"}'), "structured.json_schema"),
    (dict(json_schema="[1"), "structured.json_schema"),
    (dict(json_schema="[1]"), "structured.json_schema"),
    (dict(regex="(a"), "structured.regex"),
    (dict(regex=""), "structured.regex"),
    (dict(grammar="start: undefined_rule"), "structured.grammar"),
    (dict(grammar='start: "a" <|no_such_token|>'), "structured.grammar"),
    (dict(choice=pb.Choices()), "structured.choice"),
    (dict(choice=pb.Choices(choices=["a", ""])), "structured.choice[1]"),
    (dict(json_object=False), "structured.json_object"),
    (dict(), "structured"),
])
def test_a_bad_structured_output_is_refused_naming_its_field(structured: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        _v(**structured)
    assert e.value.field == field


def test_structured_output_refuses_allowed_token_ids_beside_it() -> None:
    req = pb.GenerateRequest(prompt="hi", allowed_token_ids=[5], structured=pb.StructuredOutput(regex="a+"))
    with pytest.raises(InvalidArgument) as e:
        validate(req, TOK, LIMITS, 120)
    assert e.value.field == "allowed_token_ids"


def test_each_kind_becomes_the_grammar_the_workers_get() -> None:
    assert _v(regex="a+").sampling.grammar == grammar_text("regex", "a+")
    assert _v(choice=pb.Choices(choices=['say "hi"', "x|y"])).sampling.grammar == grammar_text(
        "choice", ['say "hi"', "x|y"])
    assert validate(pb.GenerateRequest(prompt="hi"), TOK, LIMITS, 120).sampling.grammar == ""


def test_starts_after_and_free_opener_reach_the_workers_checked() -> None:
    sp = _v(regex="a+", starts_after="</think>", free_opener="{").sampling
    assert (sp.grammar_after, sp.grammar_free_opener) == ("</think>", "{")
    assert _v(regex="a+").sampling.grammar_after == ""
    for fields, field in [(dict(starts_after="x" * 65), "structured.starts_after"),
                          (dict(starts_after="x", free_opener="<think>"), "structured.free_opener"),  # 7 tokens here
                          (dict(free_opener="{"), "structured.free_opener")]:
        with pytest.raises(InvalidArgument) as e:
            _v(regex="a+", **fields)
        assert e.value.field == field, fields


def test_a_chat_answer_under_a_reasoning_parser_thinks_before_its_grammar() -> None:
    from router.reasoning import think_first

    req = _v(regex="a+")
    assert think_first(req, True, TOK).sampling.grammar_after == "</think>"  # the prompt opened the block
    assert think_first(req, False, TOK) is req  # <think> is 7 tokens here: the grammar holds at once
    opened = think_first(req, False, _thinking_tokenizer()).sampling
    assert (opened.grammar_after, opened.grammar_free_opener) == ("</think>", "<think>")
    free = validate(pb.GenerateRequest(prompt="hi"), TOK, LIMITS, 120)
    assert think_first(free, True, TOK) is free


def _http(**fields):  # type: ignore[no-untyped-def]
    reqs, opts = parse_body(json.dumps({"model": "m", "prompt": "hi", **fields}).encode(), False, "m", 8)
    return reqs[0], opts


def test_the_http_fields_map_to_the_wire() -> None:
    req, opts = _http(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    assert json.loads(req.structured.json_schema) == SCHEMA and opts.structured_param == "response_format.json_schema.schema"
    req, _ = _http(response_format={"type": "json_object"})
    assert req.structured.json_object
    req, opts = _http(response_format={"type": "text"})
    assert not req.HasField("structured") and opts.structured_param == ""
    req, opts = _http(structured_outputs={"choice": ["a", "b"]})
    assert list(req.structured.choice.choices) == ["a", "b"] and opts.structured_param == "structured_outputs.choice"
    req, _ = _http(structured_outputs={"json": json.dumps(SCHEMA)})
    assert json.loads(req.structured.json_schema) == SCHEMA
    req, opts = _http(guided_regex="a+")
    assert req.structured.regex == "a+" and opts.structured_param == "guided_regex"
    req, _ = _http(guided_grammar='start: "a"')
    assert req.structured.grammar == 'start: "a"'


@pytest.mark.parametrize("fields, param", [
    (dict(response_format={"type": "xml"}), "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format.json_schema.schema"),
    (dict(response_format={"type": "json_object"}, guided_regex="a"), "guided_regex"),
    (dict(structured_outputs={"regex": "a", "choice": ["b"]}), "structured_outputs"),
    (dict(structured_outputs={"structural_tag": "a"}), "structured_outputs.structural_tag"),
    (dict(structured_outputs="a+"), "structured_outputs"),
    (dict(guided_choice="a"), "guided_choice"),
    (dict(guided_json=[1]), "guided_json"),
    (dict(guided_regex=5), "guided_regex"),
])
def test_bad_http_structured_fields_are_refused_naming_them(fields: dict, param: str) -> None:
    with pytest.raises(BadRequest) as e:
        _http(**fields)
    assert e.value.param == param


def test_a_guided_request_moved_midway_goes_on_to_the_same_answer() -> None:
    """On an aggregated worker (in-process): a guided greedy answer; then the same request adopted
    with its first tokens (as after its decode worker was lost) — its new Guide replays them, and the
    rest is the same, ending where the grammar does."""
    from decode_worker.aggregated import AggregatedWorker
    from decode_worker.config import AggregatedConfig
    from engine.config import KVCacheConfig, ModelConfig
    from engine.types import PrefillRequest
    from tests.cpu.test_workers_inprocess import Events

    w = AggregatedWorker("a0", ModelConfig(path="tiny"), KVCacheConfig(num_blocks=64),
                         AggregatedConfig(max_batch_tokens=64, chunk_tokens=64, max_batch_size=4))
    w.start()
    events = Events(w)
    try:
        ids = TOK("answer in JSON")["input_ids"]
        sp = SamplingParams(max_tokens=60, grammar=grammar_text("json_schema", json.dumps(SCHEMA)))
        assert w.reserve("r1", len(ids), sp, (2,), ids).ok
        res = w.prefill(PrefillRequest("r1", ids, sp, (2,), None), timeout_s=60)
        assert res.error is None and res.finished is None
        evs = events.take("r1", 60)
        whole = [res.first_token] + [t for e in evs for t in e.token_ids]
        assert evs[-1].finish_reason is not None and evs[-1].finish_reason.value == "stop"
        doc = json.loads(TOK.decode(whole))
        assert set(doc) == {"color", "ok", "n"}
        assert w.adopt("r2", ids, whole[:9], sp, (2,)).ok  # moved with 9 tokens streamed: `{"color":`
        assert whole[:9] + [t for e in events.take("r2", 60) for t in e.token_ids] == whole
        assert wait_until(w.check_idle, 5)
    finally:
        events.close()
        w.shutdown()


def test_a_worker_holds_the_answer_to_its_grammar_only_after_the_text() -> None:
    """In-process aggregated worker, greedy: with `grammar_after` set to two characters the tiny model
    writes by itself, the answer is its free answer up to them, then the grammar's; the same when
    moved midway, before the text (its Guide waits again) and after it."""
    from decode_worker.aggregated import AggregatedWorker
    from decode_worker.config import AggregatedConfig
    from engine.config import KVCacheConfig, ModelConfig
    from engine.types import PrefillRequest
    from tests.cpu.test_workers_inprocess import Events

    w = AggregatedWorker("a0", ModelConfig(path="tiny"), KVCacheConfig(num_blocks=64),
                         AggregatedConfig(max_batch_tokens=64, chunk_tokens=64, max_batch_size=4))
    w.start()
    events = Events(w)

    def answer(rid: str, sp: SamplingParams) -> tuple[list[int], str]:
        assert w.reserve(rid, len(ids), sp, (2,), ids).ok
        res = w.prefill(PrefillRequest(rid, ids, sp, (2,), None), timeout_s=60)
        assert res.error is None and res.finished is None
        evs = events.take(rid, 60)
        assert evs[-1].finish_reason is not None
        return [res.first_token] + [t for e in evs for t in e.token_ids], evs[-1].finish_reason.value

    try:
        ids = TOK("think first")["input_ids"]
        free, _ = answer("free", SamplingParams(max_tokens=16, ignore_eos=True))
        def first_seen_at(i: int) -> bool:  # tokens i, i + 1 are two printable bytes, first written there
            text = TOK.decode(free[:i + 2])
            return all(35 <= t - 3 < 127 for t in free[i:i + 2]) and text.find(text[-2:]) == len(text) - 2

        i = next(i for i in range(3, 14) if first_seen_at(i))
        marker = TOK.decode(free[i:i + 2])
        sp = SamplingParams(max_tokens=40, grammar=grammar_text("choice", ["yes", "no"]), grammar_after=marker)
        whole, finish = answer("r1", sp)
        assert whole[:i + 2] == free[:i + 2] and TOK.decode(whole[i + 2:]) in ("yes", "no") and finish == "stop"
        for streamed in (i, i + 3):  # moved with the text not yet written / with the grammar's first token
            assert w.adopt(f"m{streamed}", ids, whole[:streamed], sp, (2,)).ok
            assert whole[:streamed] + [t for e in events.take(f"m{streamed}", 60) for t in e.token_ids] == whole
        assert wait_until(w.check_idle, 5)
    finally:
        events.close()
        w.shutdown()
