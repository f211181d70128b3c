"""gRPC's tool_choice and `parsed` (router/answer_split.py behind router/server.py): the same calls,
content and thinking the HTTP front gives, unary and streamed, and refusals that name the field."""
from __future__ import annotations

import json
from typing import Any

import grpc
import openai
import pytest
import ray

from protos.pdserve.v1 import generation_pb2 as pb
from router.errors import InvalidArgument
from router.tools import grpc_tool_mode
from tests.cpu.harness import RunningServer, tiny_config

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}, "days": {"type": "integer",
                                                                                     "minimum": 1, "maximum": 9}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [pb.Tool(name="forecast", parameters=json.dumps(WEATHER)),
         pb.Tool(name="ping", parameters=json.dumps({"type": "object", "properties": {}}))]
HTTP_TOOLS = [{"type": "function", "function": {"name": t.name, "parameters": json.loads(t.parameters)}} for t in TOOLS]
ASK = [pb.ChatMessage(role="user", content="weather?")]
HERMES = (r'On it\. <tool_call>\{"name": "forecast", "arguments": \{"city": "(Oslo|Lima)", "days": [1-9]\}\}'
          r'</tool_call>')


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    ray.init(num_cpus=4, include_dashboard=False, namespace="pdserve-grpc-parsed")
    srv = RunningServer(tiny_config(server={"http_port": 0, "tool_call_parser": "hermes",
                                            "reasoning_parser": "think"}))
    yield srv
    srv.stop()
    ray.shutdown()


def both(server: RunningServer, **fields: Any) -> tuple[pb.GenerateResponse, pb.ParsedAnswer, str]:
    """The unary answer, and the stream's `parsed` deltas joined (calls merged by index) with its
    finish_reason; the stream's raw text and usage equal the unary one's."""
    req = pb.GenerateRequest(**{"messages": ASK, "tools": TOOLS, "max_tokens": 100, "temperature": 1.0, "seed": 5,
                                **fields})
    unary = server.stub.Generate(req, timeout=60)
    joined, text, finish, usage = pb.ParsedAnswer(), "", "", pb.Usage()
    for msg in server.stub.GenerateStream(req, timeout=60):
        text += msg.text
        finish = msg.finish_reason or finish
        usage = msg.usage if msg.finish_reason else usage
        joined.content += msg.parsed.content
        joined.reasoning += msg.parsed.reasoning
        for d in msg.parsed.tool_calls:
            if d.index == len(joined.tool_calls):
                assert d.id.startswith("call_") and d.name  # a call's first delta names it
                joined.tool_calls.add(id=d.id, name=d.name)
            joined.tool_calls[d.index].arguments += d.arguments
    assert text == unary.text and (usage.completion_tokens, usage.reasoning_tokens) == (
        unary.usage.completion_tokens, unary.usage.reasoning_tokens)  # cached_tokens may differ: the prefix cache
    for call in joined.tool_calls:
        call.id = ""  # ids are minted per answer
    return unary, joined, finish


def calls(parsed: pb.ParsedAnswer) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


def test_required_and_named_tool_choice_hold_the_answer_and_read_it_into_calls(server: RunningServer) -> None:
    for choice, finish in ((pb.ToolChoice(mode="required"), "tool_calls"), (pb.ToolChoice(function="forecast"), "stop")):
        unary, streamed, stream_finish = both(server, tool_choice=choice)
        assert calls(unary.parsed) == calls(streamed) and calls(streamed)
        assert unary.finish_reason == stream_finish == finish and not unary.parsed.content
        for name, args in calls(unary.parsed):
            assert name in ("forecast", "ping")
            if name == "forecast":
                assert args["city"] in ("Oslo", "Lima") and 1 <= args["days"] <= 9
        if choice.function:
            assert unary.text == unary.parsed.tool_calls[0].arguments  # the raw text is the arguments
    one, _, _ = both(server, tool_choice=pb.ToolChoice(mode="required"), parallel_tool_calls=False, max_tokens=150)
    assert len(one.parsed.tool_calls) == 1


def test_auto_is_the_default_with_a_parser_and_equals_the_http_answer(server: RunningServer) -> None:
    forced = pb.StructuredOutput(regex=HERMES)
    unary, streamed, finish = both(server, structured=forced)
    assert unary.parsed.content == streamed.content == "On it." and finish == unary.finish_reason == "tool_calls"
    assert calls(unary.parsed) == calls(streamed) and calls(unary.parsed)[0][0] == "forecast"
    assert unary.text.startswith("On it. <tool_call>")  # text stays the raw answer
    assert unary.usage.HasField("reasoning_tokens") and unary.usage.reasoning_tokens == 0  # no thinking
    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="-", max_retries=0)
    r = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "weather?"}],
                                    tools=HTTP_TOOLS, max_tokens=100, temperature=1.0, seed=5,  # type: ignore[arg-type]
                                    extra_body={"structured_outputs": {"regex": HERMES}})
    m = r.choices[0].message
    assert (m.content, [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls or []]) == (
        unary.parsed.content, calls(unary.parsed))
    plain, _, _ = both(server, tool_choice=pb.ToolChoice(mode="none"), structured=forced)
    assert plain.text == unary.text and plain.finish_reason == "stop"  # thinking is still split out: parsed is set
    assert plain.parsed.content == plain.text and not plain.parsed.tool_calls


def test_thinking_is_split_out_and_a_grammar_waits_for_its_end(server: RunningServer) -> None:
    unary, streamed, _ = both(server, structured=pb.StructuredOutput(regex="<think>[a-z]{3,12}</think>(yes|no)"))
    assert unary.parsed.reasoning == streamed.reasoning and 3 <= len(unary.parsed.reasoning) <= 12
    assert unary.parsed.content == streamed.content and unary.parsed.content in ("yes", "no")
    thought = len(f"<think>{unary.parsed.reasoning}</think>")  # the tiny tokenizer: a token per byte
    assert unary.usage.reasoning_tokens == thought == unary.usage.completion_tokens - len(unary.parsed.content)
    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="-", max_retries=0)
    r = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "weather?"}],
                                    tools=HTTP_TOOLS, max_tokens=100, temperature=1.0, seed=5,  # type: ignore[arg-type]
                                    extra_body={"structured_outputs": {"regex": "<think>[a-z]{3,12}</think>(yes|no)"}})
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == thought
    chunks = list(oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "weather?"}], tools=HTTP_TOOLS,  # type: ignore[arg-type]
        max_tokens=100, temperature=1.0, seed=5, stream=True, stream_options={"include_usage": True},
        extra_body={"structured_outputs": {"regex": "<think>[a-z]{3,12}</think>(yes|no)"}}))
    last = chunks[-1].usage
    assert last is not None and last.completion_tokens_details is not None
    assert last.completion_tokens_details.reasoning_tokens == thought  # the stream's usage chunk
    # the prompt opens the block: the grammar holds only what follows </think>, which the tiny
    # model never writes, so it thinks as freely as without one (router/reasoning.think_first)
    opened = dict(messages=[*ASK, pb.ChatMessage(role="assistant", content="<think>")], add_generation_prompt=False,
                  continue_final_message=True, max_tokens=30, temperature=1.0, seed=3)
    free = server.generate(**opened)
    held = server.generate(structured=pb.StructuredOutput(regex="(yes|no)"), **opened)
    assert held.text == free.text and held.finish_reason == free.finish_reason
    assert held.parsed.reasoning == free.text.lstrip() and not held.parsed.content
    assert held.usage.reasoning_tokens == held.usage.completion_tokens  # never closed: all of it


@pytest.mark.parametrize("fields, field", [
    (dict(tool_choice=pb.ToolChoice(function="nope")), "tool_choice.function"),
    (dict(tool_choice=pb.ToolChoice(mode="sometimes")), "tool_choice.mode"),
    (dict(tool_choice=pb.ToolChoice(mode="required"), structured=pb.StructuredOutput(regex="x")), "structured"),
    (dict(tools=[], tool_choice=pb.ToolChoice(mode="auto")), "tool_choice"),
    (dict(tools=[pb.Tool(name="f", parameters="{")], tool_choice=pb.ToolChoice(function="f")), "tools[0].parameters"),
    (dict(tools=[pb.Tool(name="f", parameters='{"type": "wat"}')], tool_choice=pb.ToolChoice(function="f")),
     "tools[0].parameters"),  # JSON, but no schema the grammar compiler takes
])
def test_bad_tool_choices_are_refused_naming_the_field(server: RunningServer, fields: dict[str, Any],
                                                       field: str) -> None:
    req = pb.GenerateRequest(messages=ASK, **{"tools": TOOLS, **fields})
    with pytest.raises(grpc.RpcError) as e:
        server.stub.Generate(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field + ":")


def test_without_a_parser_unset_is_none_and_auto_is_refused() -> None:
    req = pb.GenerateRequest(messages=ASK, tools=TOOLS)
    assert grpc_tool_mode(req, None) is None and not req.HasField("skip_special_tokens")
    with pytest.raises(InvalidArgument) as e:
        grpc_tool_mode(pb.GenerateRequest(messages=ASK, tools=TOOLS, tool_choice=pb.ToolChoice(mode="auto")), None)
    assert e.value.field == "tool_choice"
    auto = grpc_tool_mode(req, "hermes")
    assert auto is not None and auto.kind == "auto" and req.skip_special_tokens is False  # markers may be special
    kept = pb.GenerateRequest(messages=ASK, tools=TOOLS, skip_special_tokens=True)
    assert grpc_tool_mode(kept, "hermes") is not None and kept.skip_special_tokens
