"""The OpenAI-compatible HTTP front, driven by the official `openai` client and by raw HTTP."""
from __future__ import annotations

import json
import random
import re

import httpx
import openai
import pytest
import ray

from engine.tiny import tiny_tokenizer
from tests.cpu.harness import RunningServer, prompts, tiny_config, wait_until


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    ray.init(num_cpus=4, include_dashboard=False, namespace="pdserve-http")
    srv = RunningServer(tiny_config(server={"http_port": 0, "max_body_bytes": 65536, "tool_call_parser": "hermes",
                                                      "reasoning_parser": "think"}))
    yield srv
    srv.stop()
    ray.shutdown()


@pytest.fixture(scope="module")
def oai(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="unused", max_retries=0)


def _url(server: RunningServer, path: str) -> str:
    return f"http://127.0.0.1:{server.server.http_port}{path}"


def test_completions_equal_the_grpc_answer_unary_and_streamed(server: RunningServer, oai: openai.OpenAI) -> None:
    for p in prompts(4, seed=3):
        want = server.generate(prompt=p, max_tokens=12)
        r = oai.completions.create(model="tiny", prompt=p, max_tokens=12)
        assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.token_ids)
        # the gRPC call just computed this prompt: its whole blocks but the last token's are reused
        assert r.usage.prompt_tokens_details.cached_tokens == (r.usage.prompt_tokens - 1) // 16 * 16
        salted = oai.completions.create(model="tiny", prompt=p, max_tokens=12, extra_body={"cache_salt": "t1"})
        assert salted.usage.prompt_tokens_details.cached_tokens == 0 and salted.choices[0].text == want.text
        assert r.choices[0].finish_reason == want.finish_reason
        parts = list(oai.completions.create(model="tiny", prompt=p, max_tokens=12, stream=True))
        assert "".join(c.choices[0].text for c in parts) == want.text
        assert parts[-1].choices[0].finish_reason == want.finish_reason


def test_chat_equals_the_grpc_answer_and_reports_usage_when_asked(server: RunningServer, oai: openai.OpenAI) -> None:
    from protos.pdserve.v1 import generation_pb2 as pb

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a river"}]
    want = server.stub.Generate(pb.GenerateRequest(messages=[pb.ChatMessage(**m) for m in msgs], max_tokens=10),
                                timeout=30)
    r = oai.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=10)  # type: ignore[arg-type]
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    chunks = list(oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, stream=True,  # type: ignore[arg-type]
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_sampling_fields_and_token_id_prompts(server: RunningServer, oai: openai.OpenAI) -> None:
    a = oai.completions.create(model="tiny", prompt="seeded", max_tokens=8, temperature=0.9, top_p=0.9, seed=7,
                               presence_penalty=0.5, frequency_penalty=0.2,
                               extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1})
    b = oai.completions.create(model="tiny", prompt="seeded", max_tokens=8, temperature=0.9, top_p=0.9, seed=7,
                               presence_penalty=0.5, frequency_penalty=0.2,
                               extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1})
    assert a.choices[0].text == b.choices[0].text  # same seed, same tokens
    for priority in (-5, 9):  # through the router's queue, both workers' queues: the same answer
        c = oai.completions.create(model="tiny", prompt="seeded", max_tokens=8, temperature=0.9, top_p=0.9, seed=7,
                                   presence_penalty=0.5, frequency_penalty=0.2,
                                   extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1, "priority": priority})
        assert c.choices[0].text == a.choices[0].text
    ids = oai.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=4, logprobs=2)
    lp = ids.choices[0].logprobs
    assert ids.usage.prompt_tokens == 4 and len(lp.token_logprobs) == ids.usage.completion_tokens
    from engine.tiny import tiny_tokenizer
    from protos.pdserve.v1 import generation_pb2 as pb

    want = server.stub.Generate(pb.GenerateRequest(prompt_token_ids=[5, 6, 7, 8], max_tokens=4), timeout=30)
    tok = tiny_tokenizer()
    assert lp.tokens == [tok.decode([t]) for t in want.token_ids]  # token texts, not ids
    chat = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 for c in chat.choices[0].logprobs.content)
    r = oai.completions.create(model="tiny", prompt="stop here", max_tokens=40, stop=["e"], extra_body={"ignore_eos": True})
    assert "e" not in r.choices[0].text


def test_echo_puts_the_prompt_and_its_logprobs_before_the_answer(server: RunningServer, oai: openai.OpenAI) -> None:
    """lm-eval's loglikelihood request: token-id prompts, echo, logprobs 1, max_tokens 1."""
    from engine.tiny import tiny_tokenizer
    from protos.pdserve.v1 import generation_pb2 as pb

    tok = tiny_tokenizer()
    batch = [[5, 6, 7, 8, 9], [40, 41, 42]]
    r = oai.completions.create(model="tiny", prompt=batch, max_tokens=1, logprobs=1, echo=True, temperature=0)
    for ids, c in zip(batch, sorted(r.choices, key=lambda c: c.index)):
        want = server.stub.Generate(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=1, prompt_logprobs=1,
                                                       logprobs=1), timeout=30)
        lp = c.logprobs
        assert c.text == tok.decode(ids) + want.text
        assert lp.tokens == [tok.decode([t]) for t in ids + list(want.token_ids)]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx([x.logprob for x in [*want.prompt_logprobs, *want.logprobs]])
        assert all(len(t) == 1 for t in lp.top_logprobs[1:])
    plain = oai.completions.create(model="tiny", prompt="echo me", max_tokens=3, echo=True)
    streamed = list(oai.completions.create(model="tiny", prompt="echo me", max_tokens=3, echo=True, stream=True))
    assert plain.choices[0].text.startswith("echo me") and plain.choices[0].logprobs is None
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    two = oai.completions.create(model="tiny", prompt="echo me", max_tokens=3, echo=True, n=2, logprobs=0)
    for c in two.choices:  # each choice echoes its prompt: every prompt token, then its own
        assert c.text == plain.choices[0].text
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == plain.usage.total_tokens


def test_vllm_prompt_logprobs_give_each_prompt_position_its_token_and_top_n_with_ranks(
        server: RunningServer, oai: openai.OpenAI) -> None:
    from protos.pdserve.v1 import generation_pb2 as pb

    tok, ids = tiny_tokenizer(), [5, 6, 7, 8, 9, 10]
    want = server.stub.Generate(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=2, prompt_logprobs=2), timeout=30)
    assert all(lp.HasField("rank") and lp.rank >= 1 for lp in want.prompt_logprobs)  # gRPC carries the rank too
    r = httpx.post(_url(server, "/v1/completions"), timeout=30,
                   json={"model": "tiny", "prompt": ids, "max_tokens": 2, "n": 2, "prompt_logprobs": 2}).json()
    for c in r["choices"]:
        got = c["prompt_logprobs"]
        assert got[0] is None and len(got) == len(ids)
        for pos, lp in zip(got[1:], want.prompt_logprobs):
            assert list(pos)[0] == str(lp.token_id)  # the prompt's token first, then the top 2
            assert pos[str(lp.token_id)] == {"logprob": pytest.approx(lp.logprob), "rank": lp.rank,
                                             "decoded_token": tok.decode([lp.token_id])}
            for rank, top in enumerate(lp.top_logprobs, 1):
                assert pos[str(top.token_id)]["logprob"] == pytest.approx(top.logprob)
                assert pos[str(top.token_id)]["rank"] == (lp.rank if top.token_id == lp.token_id else rank)
            assert len(pos) == 3 - (lp.rank <= 2)
        assert c["logprobs"] is None
    msgs = [{"role": "user", "content": "hi"}]
    chat = httpx.post(_url(server, "/v1/chat/completions"), timeout=30,
                      json={"model": "tiny", "messages": msgs, "max_tokens": 2, "prompt_logprobs": 0}).json()
    n_prompt = chat["usage"]["prompt_tokens"]
    assert len(chat["prompt_logprobs"]) == n_prompt and all(len(p) == 1 for p in chat["prompt_logprobs"][1:])
    for body, param in [({"prompt": ids, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
                        ({"prompt": ids, "prompt_logprobs": 1, "echo": True, "logprobs": 2}, "prompt_logprobs"),
                        ({"prompt": ids, "prompt_logprobs": 21}, "prompt_logprobs"),
                        ({"prompt": ids, "prompt_logprobs": -1}, "prompt_logprobs")]:
        bad = httpx.post(_url(server, "/v1/completions"), json={"model": "tiny", **body}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, (body, bad.text)


def test_allowed_token_ids_hold_on_the_prefill_and_the_decode_worker(server: RunningServer, oai: openai.OpenAI) -> None:
    tok = tiny_tokenizer()
    allowed = sorted({t for t in tok("abc xyz")["input_ids"]})
    for temperature in (0.0, 1.0):
        r = oai.completions.create(model="tiny", prompt="spell it", max_tokens=12, temperature=temperature, seed=5,
                                   extra_body={"allowed_token_ids": allowed})
        assert r.usage.completion_tokens == 12 and set(tok(r.choices[0].text)["input_ids"]) <= set(allowed)
    free = server.generate(prompt="spell it", max_tokens=12, ignore_eos=True)
    assert not set(free.token_ids) <= set(allowed)  # without it the answer leaves the set
    got = server.generate(prompt="spell it", max_tokens=12, allowed_token_ids=allowed)
    assert set(got.token_ids) <= set(allowed) and len(got.token_ids) == 12  # EOS not listed: never drawn
    bad = httpx.post(_url(server, "/v1/completions"), timeout=30,
                     json={"model": "tiny", "prompt": "x", "allowed_token_ids": [1, "a"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "allowed_token_ids"


def test_structured_outputs_hold_through_the_prefill_and_the_decode_worker(server: RunningServer,
                                                                          oai: openai.OpenAI) -> None:
    from protos.pdserve.v1 import generation_pb2 as pb

    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["color", "ok", "n"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}}
    msgs = [{"role": "user", "content": "pick one"}]
    for temperature in (0.0, 1.0):
        r = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=60, temperature=temperature,  # type: ignore[arg-type]
                                        seed=4, response_format=fmt)  # type: ignore[arg-type]
        doc = json.loads(r.choices[0].message.content or "")
        assert set(doc) == {"color", "ok", "n"} and doc["color"] in ("red", "green", "blue")
        assert isinstance(doc["ok"], bool) and 0 <= doc["n"] <= 999 and r.choices[0].finish_reason == "stop"
        streamed = list(oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=60,  # type: ignore[arg-type]
                                                    temperature=temperature, seed=4, response_format=fmt,  # type: ignore[arg-type]
                                                    stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == r.choices[0].message.content
    free = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=60)  # type: ignore[arg-type]
    with pytest.raises(json.JSONDecodeError):  # the tiny random model writes no JSON by itself
        json.loads(free.choices[0].message.content or "")
    # one of some strings (gRPC); a one-token choice ends on the prefill worker's first token
    for choices in (["alpha", "beta gamma"], ["a", "b"]):
        got = server.generate(prompt="choose", structured=pb.StructuredOutput(choice=pb.Choices(choices=choices)))
        assert got.text in choices and got.finish_reason == "stop"
    r2 = oai.completions.create(model="tiny", prompt="code", max_tokens=20, temperature=1.0, seed=9,
                                extra_body={"structured_outputs": {"regex": "[a-c]{3}-[0-9]{2}"}})
    assert re.fullmatch("[a-c]{3}-[0-9]{2}", r2.choices[0].text) and r2.choices[0].finish_reason == "stop"
    bad = httpx.post(_url(server, "/v1/chat/completions"), timeout=30, json={
        "model": "tiny", "messages": msgs, "response_format": {"type": "json_schema",
                                                              "json_schema": {"name": "x", "schema": {"type": "nope"}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format.json_schema.schema", bad.text
    assert "nope" in bad.json()["error"]["message"]


WEATHER = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}, "days": {"type": "integer",
                                                                                     "minimum": 1, "maximum": 9}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}]


def _calls(message_or_chunks) -> list[tuple[str, dict]]:  # type: ignore[no-untyped-def]
    """(name, arguments) of a unary message's tool calls, or of a stream's deltas merged by index."""
    if isinstance(message_or_chunks, list):
        merged: dict[int, list] = {}
        for chunk in message_or_chunks:
            for d in chunk.choices[0].delta.tool_calls or []:
                if d.index not in merged:
                    assert d.id and d.function.name  # a call's first delta names it
                    merged[d.index] = [d.function.name, ""]
                merged[d.index][1] += d.function.arguments or ""
        return [(name, json.loads(args)) for name, args in merged.values()]
    return [(c.function.name, json.loads(c.function.arguments)) for c in message_or_chunks.tool_calls or []]


def test_tool_choice_required_and_named_hold_the_answer_to_the_tools(oai: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "weather?"}]
    named = {"type": "function", "function": {"name": "forecast"}}
    for temperature in (0.0, 1.0):
        for choice in ("required", named):
            kw = dict(model="tiny", messages=msgs, tools=TOOLS, tool_choice=choice, max_tokens=80, temperature=temperature,
                      seed=5)
            r = oai.chat.completions.create(**kw)  # type: ignore[call-overload]
            calls = _calls(r.choices[0].message)
            assert calls and r.choices[0].message.content is None
            for name, args in calls:
                assert name in ("forecast", "ping")
                if name == "forecast":
                    assert args["city"] in ("Oslo", "Lima") and 1 <= args["days"] <= 9 and set(args) == {"city", "days"}
            if choice == named:
                assert [n for n, _ in calls] == ["forecast"] and r.choices[0].finish_reason == "stop"  # OpenAI's
            else:
                assert r.choices[0].finish_reason == "tool_calls"
            chunks = list(oai.chat.completions.create(stream=True, **kw))  # type: ignore[call-overload]
            assert _calls(chunks) == calls and chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    one = oai.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
                                      parallel_tool_calls=False, max_tokens=120, temperature=1.0, seed=1)
    assert len(one.choices[0].message.tool_calls or []) == 1


def test_tool_choice_auto_reads_hermes_blocks_out_of_the_text(server: RunningServer, oai: openai.OpenAI) -> None:
    """The tiny model writes no tool call by itself: a regex makes it write one (after some text),
    and the hermes parser reads it, streamed or not; multi-turn tool messages are taken."""
    forced = {"structured_outputs": {"regex": r'On it\. <tool_call>\{"name": "forecast", "arguments": '
                                              r'\{"city": "(Oslo|Lima)", "days": [1-9]\}\}</tool_call>'}}
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "ping", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": "pong"}]
    kw = dict(model="tiny", messages=msgs, tools=TOOLS, max_tokens=100, temperature=1.0, seed=2, extra_body=forced)
    r = oai.chat.completions.create(**kw)  # type: ignore[call-overload]
    m = r.choices[0].message
    assert m.content == "On it." and r.choices[0].finish_reason == "tool_calls"
    [(name, args)] = _calls(m)
    assert name == "forecast" and args["city"] in ("Oslo", "Lima")
    chunks = list(oai.chat.completions.create(stream=True, **kw))  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "On it."
    assert _calls(chunks) == _calls(m) and chunks[-1].choices[0].finish_reason == "tool_calls"
    free = oai.chat.completions.create(model="tiny", messages=msgs[:1], tools=TOOLS, max_tokens=20)  # type: ignore[arg-type]
    plain = oai.chat.completions.create(model="tiny", messages=msgs[:1], max_tokens=20)  # type: ignore[arg-type]
    assert free.choices[0].message.tool_calls is None and free.choices[0].finish_reason == plain.choices[0].finish_reason
    bad = httpx.post(_url(server, "/v1/chat/completions"), timeout=30, json={
        "model": "tiny", "messages": msgs[:1], "tools": TOOLS, "tool_choice": {"type": "function",
                                                                              "function": {"name": "nope"}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice.function.name"


def test_thinking_is_split_from_the_answer_streamed_or_not(server: RunningServer, oai: openai.OpenAI) -> None:
    """The tiny model does not think by itself: a regex makes it write a think block, opened by the
    answer or (continue_final_message) by the prompt, where a grammar waits for its end; then one
    with a tool call after its thinking."""
    from protos.pdserve.v1 import generation_pb2 as pb

    def both(**kw):  # type: ignore[no-untyped-def]
        r = oai.chat.completions.create(model="tiny", max_tokens=80, temperature=1.0, seed=3, **kw)
        chunks = list(oai.chat.completions.create(model="tiny", max_tokens=80, temperature=1.0, seed=3, stream=True,
                                                  **kw))
        streamed = ("".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks),
                    "".join(c.choices[0].delta.content or "" for c in chunks))
        m = r.choices[0].message
        assert streamed == (m.model_extra["reasoning_content"] or "", m.content or "")
        assert m.model_extra["reasoning"] == m.model_extra["reasoning_content"]
        return m, r.choices[0].finish_reason

    msgs = [{"role": "user", "content": "2+2?"}]
    m, finish = both(messages=msgs, extra_body={"guided_regex": "<think>[a-z]{3,12}</think>(yes|no)"})
    assert re.fullmatch("[a-z]{3,12}", m.model_extra["reasoning_content"]) and m.content in ("yes", "no")
    opened = msgs + [{"role": "assistant", "content": "<think>"}]  # the prompt opens the block: all is thinking
    cont = {"add_generation_prompt": False, "continue_final_message": True}
    m, finish = both(messages=opened, extra_body={**cont, "ignore_eos": True})
    want = server.stub.Generate(pb.GenerateRequest(messages=[pb.ChatMessage(**x) for x in opened], max_tokens=80,
                                                   temperature=1.0, seed=3, ignore_eos=True, **cont), timeout=30)
    assert m.model_extra["reasoning_content"] == want.text.lstrip() and not m.content and finish == "length"
    free, free_finish = both(messages=opened, extra_body=cont)
    # a grammar holds only what follows </think>, which the tiny model never writes: it thinks freely
    m, finish = both(messages=opened, extra_body={**cont, "guided_regex": "(yes|no)"})
    assert m.model_extra["reasoning_content"] == free.model_extra["reasoning_content"] and not m.content
    assert finish == free_finish
    m, finish = both(messages=msgs, tools=TOOLS, extra_body={"guided_regex": '<think>[a-z]{3,8}</think><tool_call>'
                                                             '\\{"name": "ping", "arguments": \\{\\}\\}</tool_call>'})
    assert m.model_extra["reasoning_content"] and m.content is None and finish == "tool_calls"
    assert _calls(m) == [("ping", {})]
    m, _ = both(messages=msgs, extra_body={"guided_regex": "<think>[a-z]{3,8}</think>ok", "include_reasoning": False})
    assert m.model_extra["reasoning_content"] is None and m.content == "ok"


def test_a_grpc_grammar_that_starts_after_a_text_holds_only_what_follows_it(server: RunningServer) -> None:
    """`structured.starts_after`: free until the text, then the grammar (prefill and decode workers);
    never written: all free."""
    from protos.pdserve.v1 import generation_pb2 as pb

    free = server.generate(prompt="so we think", max_tokens=12, ignore_eos=True).text
    i = next(i for i in range(10) if all("!" <= c <= "~" for c in free[:i + 2]) and free.find(free[i:i + 2]) == i)
    held = server.generate(prompt="so we think", max_tokens=40, structured=pb.StructuredOutput(
        choice=pb.Choices(choices=["yes", "no"]), starts_after=free[i:i + 2]))
    assert held.text[:i + 2] == free[:i + 2] and held.text[i + 2:] in ("yes", "no") and held.finish_reason == "stop"
    never = server.generate(prompt="so we think", max_tokens=12, ignore_eos=True, structured=pb.StructuredOutput(
        regex="(yes|no)", starts_after="\u2603"))
    assert never.text == free and never.finish_reason == "length"


def test_bad_words_are_never_written_through_both_fronts(server: RunningServer, oai: openai.OpenAI) -> None:
    """A one-token word (the first token: the prefill worker's) and one of two tokens (decode), as
    the tiny model writes them greedily (one token a byte): gone from the answer, which is the
    model's until the word would be completed."""
    free = list(server.generate(prompt="the cat", max_tokens=16, ignore_eos=True).token_ids)
    text = [chr(t - 3) if 33 <= t - 3 <= 126 else "" for t in free]  # printable bytes
    i = next(i for i in range(1, 12) if all(text[:i + 2]) and "".join(text[:i + 2]).find(text[i] + text[i + 1]) == i)
    first, pair = text[0], text[i] + text[i + 1]
    no_first = server.generate(prompt="the cat", max_tokens=16, ignore_eos=True, bad_words=[first])
    assert no_first.token_ids[0] != free[0] and first not in no_first.text
    no_pair = server.generate(prompt="the cat", max_tokens=16, ignore_eos=True, bad_words=[pair])
    assert list(no_pair.token_ids[:i + 1]) == free[:i + 1] and no_pair.token_ids[i + 1] != free[i + 1]
    assert pair not in no_pair.text
    r = oai.completions.create(model="tiny", prompt="the cat", max_tokens=16, extra_body={"ignore_eos": True,
                                                                                         "bad_words": [pair]})
    assert r.choices[0].text == no_pair.text
    bad = httpx.post(_url(server, "/v1/completions"), timeout=30, json={"model": "tiny", "prompt": "x",
                                                                        "bad_words": "nope"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "bad_words"


def test_logit_bias_bans_and_forces_tokens_through_both_fronts(server: RunningServer, oai: openai.OpenAI) -> None:
    plain = server.generate(prompt="bias me", max_tokens=6, ignore_eos=True)
    banned = server.generate(prompt="bias me", max_tokens=6, ignore_eos=True, logit_bias={plain.token_ids[0]: -100.0})
    assert banned.token_ids[0] != plain.token_ids[0]
    r = oai.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=5, temperature=1.0, logit_bias={"42": 100},
                               logprobs=0, extra_body={"ignore_eos": True})
    from engine.tiny import tiny_tokenizer

    assert r.choices[0].logprobs.tokens == [tiny_tokenizer().decode([42])] * 5
    from protos.pdserve.v1 import generation_pb2 as pb

    forced = server.stub.Generate(pb.GenerateRequest(prompt_token_ids=[5, 6, 7], max_tokens=5, temperature=1.0,
                                                     logit_bias={42: 100.0}, ignore_eos=True), timeout=30)
    assert list(forced.token_ids) == [42] * 5


def test_min_tokens_holds_off_stop_ids_and_stop_strings(server: RunningServer, oai: openai.OpenAI) -> None:
    plain = server.generate(prompt_token_ids=[9, 8, 7], max_tokens=8, ignore_eos=True)
    t = list(plain.token_ids)
    first = server.generate(prompt_token_ids=[9, 8, 7], max_tokens=8, stop_token_ids=[t[0]])
    assert list(first.token_ids) == [t[0]] and first.finish_reason == "stop"
    held = server.generate(prompt_token_ids=[9, 8, 7], max_tokens=8, stop_token_ids=[t[0], t[2]], min_tokens=4)
    ids = list(held.token_ids)
    assert len(ids) >= 4 and not {t[0], t[2]} & set(ids[:4])  # banned on the prefill worker's token and decode's
    from engine.tiny import tiny_tokenizer

    word = tiny_tokenizer().decode([t[1]])
    cut = oai.completions.create(model="tiny", prompt=[9, 8, 7], max_tokens=8, stop=[word],
                                 extra_body={"ignore_eos": True})
    late = oai.completions.create(model="tiny", prompt=[9, 8, 7], max_tokens=8, stop=[word],
                                  extra_body={"ignore_eos": True, "min_tokens": 3})
    assert cut.choices[0].text == tiny_tokenizer().decode(t[:1]) and cut.choices[0].finish_reason == "stop"
    assert late.choices[0].text.startswith(tiny_tokenizer().decode(t[:3]))  # not cut within its first 3 tokens


def test_vllm_stop_and_special_token_fields_shape_the_text(server: RunningServer, oai: openai.OpenAI) -> None:
    """vLLM's stop_token_ids, include_stop_str_in_output and skip_special_tokens: the token (or
    string) that ended the answer has no text unless asked for; special tokens have none unless
    asked for."""
    from engine.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    t = list(server.generate(prompt_token_ids=[9, 8, 7], max_tokens=8, ignore_eos=True).token_ids)
    i = next(i for i in range(1, len(t)) if t[i] not in t[:i])  # the first token not seen before it
    kw: dict = dict(model="tiny", prompt=[9, 8, 7], max_tokens=8)  # type: ignore[type-arg]
    cut = oai.completions.create(**kw, extra_body={"ignore_eos": True, "stop_token_ids": [t[i]]}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == tok.decode(t[:i], skip_special_tokens=True)
    kept = oai.completions.create(**kw, extra_body={"ignore_eos": True, "stop_token_ids": [t[i]],
                                                    "include_stop_str_in_output": True}).choices[0]
    assert kept.text == tok.decode(t[: i + 1], skip_special_tokens=True) != cut.text
    word = tok.decode([t[1]])
    by_word = oai.completions.create(**kw, stop=[word], extra_body={"ignore_eos": True}).choices[0]
    with_word = oai.completions.create(**kw, stop=[word], extra_body={"ignore_eos": True,
                                                                      "include_stop_str_in_output": True}).choices[0]
    assert by_word.finish_reason == with_word.finish_reason == "stop" and with_word.text == by_word.text + word
    eos = tok.eos_token_id  # forced first: the prefill worker's token ends the answer
    forced = dict(kw, logit_bias={str(eos): 100})
    assert oai.completions.create(**forced).choices[0].text == ""
    assert oai.completions.create(**forced, extra_body={"skip_special_tokens": False}).choices[0].text == ""
    shown = oai.completions.create(**forced, extra_body={"skip_special_tokens": False,
                                                         "include_stop_str_in_output": True}).choices[0]
    assert shown.finish_reason == "stop" and shown.text == tok.decode([eos]) == "<|im_end|>"
    assert oai.completions.create(**forced, extra_body={"include_stop_str_in_output": True}).choices[0].text == ""


def test_vllm_chat_template_and_truncation_fields(server: RunningServer, oai: openai.OpenAI) -> None:
    """add_generation_prompt, continue_final_message, chat_template_kwargs, truncate_prompt_tokens: a
    client written for vLLM sent them and got 400 unsupported_parameter."""
    from protos.pdserve.v1 import generation_pb2 as pb

    msgs = [{"role": "user", "content": "name a river"}, {"role": "assistant", "content": "The river"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=8)
    cont = oai.chat.completions.create(**kw, extra_body={"continue_final_message": True,  # type: ignore[call-overload]
                                                         "add_generation_prompt": False})
    want = server.stub.Generate(pb.GenerateRequest(messages=[pb.ChatMessage(**m) for m in msgs], max_tokens=8,
                                                   continue_final_message=True), timeout=30)
    assert cont.choices[0].message.content == want.text
    tok = tiny_tokenizer()
    left_open = tok.apply_chat_template(msgs, continue_final_message=True)["input_ids"]
    closed = tok.apply_chat_template(msgs)["input_ids"]  # ... The river<|im_end|>\n
    assert cont.usage.prompt_tokens == len(left_open) == len(closed) - 2
    with_kwargs = oai.chat.completions.create(**kw, extra_body={"chat_template_kwargs": {"enable_thinking": False}})  # type: ignore[call-overload]
    assert with_kwargs.choices[0].message.content == oai.chat.completions.create(**kw).choices[0].message.content  # type: ignore[call-overload]
    r = httpx.post(_url(server, "/v1/chat/completions"), timeout=30,
                   json={**kw, "chat_template_kwargs": {"chat_template": "{{ 'mine' }}"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs.chat_template", r.text
    p = "the quick brown fox jumps over the lazy dog"
    ids = tok(p)["input_ids"]
    cut = oai.completions.create(model="tiny", prompt=p, max_tokens=6, echo=True, logprobs=0,
                                 extra_body={"truncate_prompt_tokens": 5, "ignore_eos": True})
    assert cut.usage.prompt_tokens == 5
    assert cut.choices[0].text.startswith(tok.decode(ids[-5:])) and len(cut.choices[0].logprobs.tokens) == 5 + 6
    assert cut.choices[0].text == tok.decode(ids[-5:]) + server.generate(prompt_token_ids=ids[-5:], max_tokens=6,
                                                                                  ignore_eos=True).text


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(server: RunningServer, oai: openai.OpenAI) -> None:
    p = "the quick brown fox"
    parts = list(oai.completions.create(model="tiny", prompt=p, max_tokens=8, n=2, stream=True,
                                        extra_body={"ignore_eos": True},
                                        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    n_prompt = len(tiny_tokenizer()(p)["input_ids"])
    for i in range(2):
        mine = [c for c in parts if c.choices and c.choices[0].index == i]
        made = [c.usage.completion_tokens for c in mine]
        assert made == sorted(made) and made[-1] == 8 and made[0] >= 1  # grows to the answer's length
        assert all(c.usage.prompt_tokens == n_prompt and c.usage.total_tokens == n_prompt + c.usage.completion_tokens
                   for c in mine)
    assert parts[-1].usage.completion_tokens == 16 and not parts[-1].choices  # the total, as without it
    plain = list(oai.completions.create(model="tiny", prompt=p, max_tokens=4, stream=True))
    assert all(c.usage is None for c in plain)


def test_tokenize_and_detokenize_use_the_served_tokenizer_and_chat_template(server: RunningServer,
                                                                            oai: openai.OpenAI) -> None:
    tok = tiny_tokenizer()
    r = httpx.post(_url(server, "/tokenize"), json={"model": "tiny", "prompt": "héllo"}, timeout=30).json()
    assert r["tokens"] == tok("héllo")["input_ids"] and r["count"] == len(r["tokens"]) and r["token_strs"] is None
    assert r["max_model_len"] == httpx.get(_url(server, "/v1/models")).json()["data"][0]["max_model_len"] > 0
    msgs = [{"role": "user", "content": "name a river"}]
    chat = httpx.post(_url(server, "/tokenize"), json={"messages": msgs, "return_token_strs": True}, timeout=30).json()
    assert chat["count"] == oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=1).usage.prompt_tokens  # type: ignore[arg-type]
    assert chat["token_strs"] == tok.convert_ids_to_tokens(chat["tokens"])
    open_ = httpx.post(_url(server, "/tokenize"), json={"messages": msgs, "add_generation_prompt": False}).json()
    assert open_["count"] == chat["count"] - len(tok("<|im_start|>assistant\n")["input_ids"])
    back = httpx.post(_url(server, "/detokenize"), json={"model": "tiny", "tokens": r["tokens"]}, timeout=30).json()
    assert back == {"prompt": "héllo"}
    for path, body, status, param in [
        ("/tokenize", {"prompt": "x", "max_tokens": 3}, 400, "max_tokens"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
        ("/tokenize", {"messages": msgs, "chat_template_kwargs": {"tokenize": False}}, 400,
         "chat_template_kwargs.tokenize"),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
        ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens[1]"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ]:
        bad = httpx.post(_url(server, path), json=body, timeout=30)
        assert bad.status_code == status and bad.json()["error"]["param"] == param, (path, body, bad.text)
    assert httpx.post(_url(server, "/tokenize"), content=b"{", timeout=30).status_code == 400


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tiny", "prompt": "x", "stop_token_ids": [1, -2]}, 400, "stop_token_ids"),
    ({"model": "tiny", "prompt": "x", "stop_token_ids": 5}, 400, "stop_token_ids"),
    ({"model": "tiny", "prompt": "x", "stop_token_ids": [999999]}, 400, "stop_token_ids[0]"),
    ({"model": "tiny", "prompt": "x", "skip_special_tokens": "no"}, 400, "skip_special_tokens"),
    ({"model": "tiny", "prompt": "x", "include_stop_str_in_output": 1}, 400, "include_stop_str_in_output"),
    ({"model": "tiny", "prompt": "x", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
    ({"model": "tiny", "prompt": "x", "stream_options": {"continuous_usage_stats": 1}}, 400, "continuous_usage_stats"),
    ({"model": "tiny", "prompt": "x", "truncate_prompt_tokens": 10**12}, 400, "truncate_prompt_tokens"),
    ({"model": "tiny", "prompt": "x", "add_generation_prompt": False}, 400, "add_generation_prompt"),  # chat only
    ({"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "n": 65}, 400, "n"),  # limits.max_choices
    ({"model": "tiny", "prompt": ["x"] * 65}, 400, "prompt"),
    ({"model": "tiny", "prompt": ["x", 5]}, 400, "prompt"),
    ({"model": "tiny", "prompt": ["x", "y" * 5000]}, 400, "prompt[1]"),  # past limits.max_prompt_tokens
    ({"model": "tiny", "prompt": "x", "logit_bias": {"five": 1}}, 400, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"999999": 1}}, 400, "logit_bias[999999]"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"\u00b2": 1}}, 400, "logit_bias"),  # a digit to isdigit()
    ({"model": "tiny", "prompt": "x", "logit_bias": {"99999999999999": 1}}, 400, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 10**20}, 400, "max_tokens"),  # past the wire's int32
    ({"model": "tiny", "prompt": "x", "seed": 10**30}, 400, "seed"),
    ({"model": "tiny", "prompt": "x", "top_k": 10**12}, 400, "top_k"),
    ({"model": "tiny", "prompt": "x", "logprobs": 10**12}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "x", "min_tokens": 10**12}, 400, "min_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "other", "prompt": "x"}, 404, "model"),
    ({"model": "tiny"}, 400, "prompt"),
])
def test_refusals_in_openai_shape(server: RunningServer, body: dict, status: int, param: str) -> None:  # type: ignore[type-arg]
    r = httpx.post(_url(server, "/v1/completions"), json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_n_choices_and_prompt_batches_are_requests_of_their_own(server: RunningServer, oai: openai.OpenAI) -> None:
    p, q = prompts(2, seed=11)
    want = {x: server.generate(prompt=x, max_tokens=10) for x in (p, q)}
    r = oai.completions.create(model="tiny", prompt=p, max_tokens=10, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2] and {c.text for c in r.choices} == {want[p].text}  # greedy
    assert r.usage.prompt_tokens == want[p].usage.prompt_tokens
    assert r.usage.completion_tokens == 3 * len(want[p].token_ids)  # the prompt once, every choice's answer
    batch = oai.completions.create(model="tiny", prompt=[p, q], max_tokens=10, n=2)
    assert [c.text for c in batch.choices] == [want[p].text] * 2 + [want[q].text] * 2  # prompt j's i-th: j * n + i
    assert batch.usage.prompt_tokens == r.usage.prompt_tokens + oai.completions.create(
        model="tiny", prompt=q, max_tokens=1).usage.prompt_tokens
    sampled = dict(model="tiny", prompt=p, max_tokens=10, temperature=1.0)
    seeded = oai.completions.create(n=3, seed=40, **sampled)  # type: ignore[arg-type]
    alone = [oai.completions.create(seed=40 + i, **sampled).choices[0].text for i in range(3)]  # type: ignore[arg-type]
    assert [c.text for c in seeded.choices] == alone  # choice i draws as seed + i does alone
    parts = list(oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], max_tokens=10,
                                             n=2, stream=True, stream_options={"include_usage": True}))
    chat = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], max_tokens=10)
    for i in range(2):
        mine = [c.choices[0] for c in parts if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and all(c.delta.role is None for c in mine[1:])
        assert "".join(c.delta.content or "" for c in mine) == chat.choices[0].message.content
        assert [c.finish_reason for c in mine][-1] == chat.choices[0].finish_reason
    assert parts[-1].usage.completion_tokens == 2 * chat.usage.completion_tokens
    assert wait_until(server.all_idle, 10)


def test_a_client_gone_mid_stream_cancels_every_choice(server: RunningServer) -> None:
    def decode(field: str) -> int:
        return sum(getattr(w, field) for w in server.status() if w.role == "decode")

    before = decode("tokens_generated")
    body = {"model": "tiny", "prompt": "go on " * 20, "max_tokens": 1000, "stream": True, "ignore_eos": True, "n": 3}
    with httpx.stream("POST", _url(server, "/v1/completions"), json=body, timeout=60) as r:
        seen: set[int] = set()
        for ln in r.iter_lines():  # until all three decode at once
            if ln.startswith("data: {"):
                seen.add(json.loads(ln[6:])["choices"][0]["index"])
                if seen == {0, 1, 2} and decode("running") == 3:
                    break
        assert seen == {0, 1, 2}
    assert wait_until(server.all_idle, 10)  # the disconnect cancelled all three on both workers
    assert decode("tokens_generated") - before < 3 * 999  # cut short, not run to their end


def test_a_client_gone_before_a_unary_answer_cancels_its_requests(server: RunningServer) -> None:
    def decoded() -> int:
        return sum(w.tokens_generated for w in server.status() if w.role == "decode")

    before = decoded()
    body = {"model": "tiny", "prompt": "wait for it " * 10, "max_tokens": 1000, "ignore_eos": True, "n": 2}
    with pytest.raises(httpx.TimeoutException):  # the client gives up long before 2 x 1000 tokens
        httpx.post(_url(server, "/v1/completions"), json=body, timeout=0.3)
    assert wait_until(server.all_idle, 10)
    assert decoded() - before < 2 * 999  # cancelled when the client left, not run to the end


def test_models_and_health(server: RunningServer) -> None:
    assert httpx.get(_url(server, "/v1/models")).json()["data"][0]["id"] == "tiny"
    assert httpx.get(_url(server, "/health")).status_code == 200
    assert "pdserve_requests_total" in httpx.get(_url(server, "/metrics")).text


def test_a_stream_closed_by_the_client_frees_kv_on_both_workers(server: RunningServer) -> None:
    body = {"model": "tiny", "prompt": "go on " * 20, "max_tokens": 1000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", _url(server, "/v1/completions"), json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(ln.startswith("data: {") for ln in got)
        assert any(w.kv_blocks_used > 0 for w in server.status() if w.role == "decode")
    assert wait_until(server.all_idle, 10)  # the disconnect cancelled it on both workers


def test_fuzzed_bodies_get_only_2xx_or_4xx_and_the_server_stays_up(server: RunningServer) -> None:
    rng = random.Random(5)
    keys = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
            "logprobs", "top_k", "ignore_eos", "stream_options", "bogus", "min_tokens", "top_logprobs", "logit_bias", "echo",
            "add_generation_prompt", "continue_final_message", "chat_template_kwargs", "truncate_prompt_tokens",
            "tokens", "add_special_tokens", "return_token_strs"]
    values = [None, 0, -1, 1, 3.5, 1e308, 10**20, "tiny", "", "x" * 10, [], [1, 2], ["a"], {}, {"include_usage": True},
              True, False, [{"role": "user", "content": "hi"}], [{"role": 5}], {"\u00b2": 1}, {"7": -100},
              {"enable_thinking": True}, {"tokenize": False}, [{"role": "assistant", "content": "so"}]]
    bodies: list[bytes] = [b"", b"{", b"[]", b"null", b"\xff\xfe", json.dumps("str").encode(), b'{"model": "tiny",}',
                           b"[" * 5000, b'{"model": "tiny", "prompt": ' + b"[" * 5000]  # json.loads: RecursionError
    for _ in range(250):
        body = {k: rng.choice(values) for k in rng.sample(keys, rng.randrange(1, 6))}
        if rng.random() < 0.7:
            body["model"] = "tiny"
        bodies.append(json.dumps(body).encode())
    bodies.append(json.dumps({"model": "tiny", "prompt": "y" * 200_000}).encode())  # over max_body_bytes
    codes = []
    with httpx.Client(timeout=60) as c:
        for b in bodies:
            path = rng.choice(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
            r = c.post(_url(server, path), content=b, headers={"content-type": "application/json"})
            codes.append(r.status_code)
            if r.status_code >= 400:
                assert "error" in r.json()
    assert all(200 <= c < 500 for c in codes), sorted(set(codes))
    assert 413 in codes and 400 in codes
    assert httpx.get(_url(server, "/health")).status_code == 200
    assert wait_until(server.all_idle, 10)


def test_fuzzed_tool_and_reasoning_fields_get_only_2xx_or_4xx(server: RunningServer) -> None:
    """Tools, tool choices and tool messages of every shape, good and bad: a 200 carries calls to
    tools of the request only, a refusal names a field, nothing is a 5xx, and no KV is left."""
    rng = random.Random(8)
    tools = [TOOLS, [], [TOOLS[0]], "x", [{"type": "function"}], [{"type": "function", "function": {"name": "a b"}}],
             [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
             [{"type": "function", "function": {"name": "f", "parameters": {"enum": [str(i) for i in range(300)]}}}],
             [{"type": "function", "function": {"name": "f", "parameters": json.loads("[" * 60 + "]" * 60)}}],
             TOOLS + [TOOLS[1]], [{"type": "function", "function": {"name": "f", "description": 5}}]]
    choices = [None, "none", "auto", "required", "sometimes", 5, {"type": "function", "function": {"name": "ping"}},
               {"type": "function", "function": {"name": "f"}}, {"type": "function"}, {"function": {"name": "ping"}}]
    messages = [[{"role": "user", "content": "hi"}],
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "ping", "arguments": "{}"}}]},
                 {"role": "tool", "tool_call_id": "c1", "content": "pong"}],
                [{"role": "assistant", "tool_calls": "x"}], [{"role": "tool", "content": "x"}],
                [{"role": "assistant", "content": None}], [{"role": "user", "content": "x", "reasoning": 5}],
                [{"role": "assistant", "content": "a", "reasoning_content": "b"}],
                [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "not json"}}]}]]
    extras = [{}, {"parallel_tool_calls": False}, {"parallel_tool_calls": "no"}, {"include_reasoning": False},
              {"include_reasoning": 1}, {"response_format": {"type": "json_object"}}, {"stream": True},
              {"guided_regex": "<think>a</think>b"}, {"n": 2}]
    codes = []
    with httpx.Client(timeout=60) as c:
        for _ in range(120):
            body = {"model": "tiny", "messages": rng.choice(messages), "max_tokens": rng.choice([4, 24]),
                    "temperature": rng.choice([0.0, 1.0]), **rng.choice(extras)}
            for key, pool in (("tools", tools), ("tool_choice", choices)):
                if rng.random() < 0.8:
                    body[key] = rng.choice(pool)
            r = c.post(_url(server, "/v1/chat/completions"), json=body)
            codes.append(r.status_code)
            if r.status_code >= 400:
                assert r.json()["error"]["param"], (body, r.text)
                continue
            names = {t["function"]["name"] for t in body.get("tools") or []}
            if body.get("stream"):
                events = [json.loads(line[6:]) for line in r.text.splitlines()
                          if line.startswith("data: {")]
                called = [d["function"].get("name") for e in events for ch in e.get("choices", [])
                          for d in ch["delta"].get("tool_calls") or [] if "name" in d.get("function", {})]
            else:
                called = [t["function"]["name"] for ch in r.json()["choices"] for t in ch["message"].get("tool_calls") or []]
            assert set(called) <= names, (body, r.text)
    assert all(200 <= code < 500 for code in codes), sorted(set(codes))
    assert 200 in codes and 400 in codes
    assert httpx.get(_url(server, "/health")).status_code == 200
    assert wait_until(server.all_idle, 10)


def test_responses_api_answers_as_chat_does(server: RunningServer, oai: openai.OpenAI) -> None:
    """/v1/responses over the tiny model: the chat answer's text as its message's output_text,
    cut by max_output_tokens as `incomplete`; streamed, its deltas make the same text; text.format
    holds it to a schema (the scripted answers with reasoning and calls: tests/cpu/test_responses.py)."""
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a river"}]
    chat = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=10)  # type: ignore[arg-type]
    r = oai.responses.create(model="tiny", instructions="be brief", input="name a river", max_output_tokens=10)
    assert r.output_text == chat.choices[0].message.content and [i.type for i in r.output] == ["message"]
    assert (r.status, r.incomplete_details and r.incomplete_details.reason) == (
        ("incomplete", "max_output_tokens") if chat.choices[0].finish_reason == "length" else ("completed", None))
    assert r.usage is not None and (r.usage.input_tokens, r.usage.output_tokens) == (
        chat.usage.prompt_tokens, chat.usage.completion_tokens)  # type: ignore[union-attr]
    events = list(oai.responses.create(model="tiny", instructions="be brief", input="name a river",
                                       max_output_tokens=10, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text  # type: ignore[union-attr]
    assert events[-1].type == f"response.{r.status}" and events[-1].response.output_text == r.output_text  # type: ignore[union-attr]
    schema = {"type": "object", "properties": {"river": {"type": "string", "maxLength": 8}}, "required": ["river"],
              "additionalProperties": False}
    held = oai.responses.create(model="tiny", input="name a river", max_output_tokens=60, temperature=1.0,
                                text={"format": {"type": "json_schema", "name": "r", "schema": schema}})
    assert set(json.loads(held.output_text)) == {"river"}
