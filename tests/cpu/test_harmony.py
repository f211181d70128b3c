"""gpt-oss's harmony answers (router/harmony.py behind router/answer_split.py): channels into
reasoning, content and tool calls, however the text is cut; the server's options around them."""
from __future__ import annotations

from typing import Any

import grpc
import openai
import pytest
from pydantic import ValidationError

from engine.tiny import tiny_tokenizer
from protos.pdserve.v1 import generation_pb2 as pb
from router import harmony
from router.answer_split import ChatSplit
from router.config import ServerConfig
from router.errors import BadRequest, InvalidArgument
from router.openai_requests import parse_body
from router.tool_calls import Delta, merged
from router.tools import ToolMode, grpc_tool_mode
from tests.cpu.scripted import ScriptedRouter

AUTO = ToolMode("auto", ("get_weather", "ping"), parser="harmony")
ANALYSIS = "<|channel|>analysis<|message|>The user wants the weather. Call it.<|end|>"
PREAMBLE = "<|start|>assistant<|channel|>commentary<|message|>Checking now.<|end|>"
CALL = ('<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
        '{"city": "Oslo"}<|call|>')
FINAL = "<|start|>assistant<|channel|>final<|message|>It is <sunny> in Oslo.<|return|>"
MARKERS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|constrain|>", "<|call|>", "<|return|>"]


def split(text: str, step: int, tools: ToolMode | None = AUTO, finish: str = "stop") -> tuple[str, str, list[Any], str]:
    """`text` fed `step` characters at a time, as a stream is: (reasoning, content, calls, finish_reason)."""
    s = ChatSplit(tools, reasoning=True, harmony=True)
    reasoning, d, end = "", Delta(), ""
    for i in range(0, len(text), step):
        last = i + step >= len(text)
        r, part, f = s.feed(text[i:i + step], finish if last else "")
        reasoning, d, end = reasoning + r, d + part, f or end
    return reasoning, d.content, [(c["function"]["name"], c["function"]["arguments"]) for c in merged(d.calls)], end


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_channels_split_into_reasoning_content_and_calls_however_the_text_is_cut(step: int) -> None:
    assert split(ANALYSIS + PREAMBLE + CALL, step) == (
        "The user wants the weather. Call it.", "Checking now.", [("get_weather", '{"city": "Oslo"}')], "tool_calls")
    assert split(ANALYSIS + FINAL, step) == ("The user wants the weather. Call it.", "It is <sunny> in Oslo.", [],
                                             "stop")
    # as a served answer's text is: its EOS (<|return|>, <|call|>) has no text
    assert split(ANALYSIS + FINAL.removesuffix("<|return|>"), step)[1] == "It is <sunny> in Oslo."
    assert split(ANALYSIS + CALL.removesuffix("<|call|>"), step)[2] == [("get_weather", '{"city": "Oslo"}')]


def test_the_recipient_may_come_before_the_channel() -> None:
    text = ANALYSIS + '<|start|>assistant to=functions.ping<|channel|>commentary json<|message|>{}<|call|>'
    assert split(text, 3)[2:] == ([("ping", "{}")], "tool_calls")


def test_a_calls_arguments_stream_as_made() -> None:
    s = ChatSplit(AUTO, reasoning=True, harmony=True)
    _, head, _ = s.feed(CALL.split("<|message|>")[0] + "<|message|>", "")
    assert [c["function"] for c in head.calls] == [{"name": "get_weather", "arguments": ""}] and head.calls[0]["id"]
    _, more, _ = s.feed('{"city": "Os', "")
    assert more.calls == [{"index": 0, "function": {"arguments": '{"city": "Os'}}]


@pytest.mark.parametrize("tools, name", [(AUTO, "nope"), (None, "get_weather"),
                                         (ToolMode("none", ("get_weather",)), "get_weather")])
def test_a_call_of_no_tool_of_the_request_is_content(tools: ToolMode | None, name: str) -> None:
    text = CALL.replace("get_weather", name)
    assert split(text, 4, tools) == ("", '{"city": "Oslo"}', [], "stop")


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    one = ToolMode("auto", ("get_weather", "ping"), parser="harmony", parallel=False)
    two = CALL.removesuffix("<|call|>") + "<|end|>" + CALL.replace("get_weather", "ping")
    assert split(two, 5, one)[2] == [("get_weather", '{"city": "Oslo"}')]
    assert len(split(two, 5)[2]) == 2


@pytest.mark.parametrize("text, want", [
    ("Plain words, no channels.", ("", "Plain words, no channels.", [], "stop")),  # not harmony: content
    ("  <|channel|>analysis<|message|>hmm", ("hmm", "", [], "length")),  # cut in its thinking
    (ANALYSIS + "<|start|>assistant<|chan", ("The user wants the weather. Call it.", "", [], "length")),  # a header
    ("<|channel|>" + "x" * 300, ("", "<|channel|>" + "x" * 300, [], "length")),  # a "header" that never ends
])
def test_answers_cut_short_or_not_harmony(text: str, want: tuple[str, str, list[Any], str]) -> None:
    assert split(text, 6, finish=want[3]) == want


def test_include_reasoning_false_drops_the_analysis() -> None:
    s = ChatSplit(None, reasoning=True, include_reasoning=False, harmony=True)
    reasoning, d, _ = s.feed(ANALYSIS + FINAL, "stop")
    assert (reasoning, d.content) == ("", "It is <sunny> in Oslo.")


def test_reasoning_tokens_are_the_analysis_messages() -> None:
    tok = tiny_tokenizer()  # a token per byte
    ids = tok.encode(ANALYSIS + FINAL, add_special_tokens=False)
    assert harmony.reasoning_tokens(ids, tok) == len(ANALYSIS)
    assert harmony.reasoning_tokens(tok.encode(FINAL, add_special_tokens=False), tok) == 0
    assert harmony.reasoning_tokens(ids[:40], tok) == 40  # cut inside its body: all of it so far
    s = ChatSplit(None, reasoning=True, count=lambda i: harmony.reasoning_tokens(i, tok), harmony=True)
    s.feed(ANALYSIS + FINAL, "stop", ids)
    assert s.reasoning_tokens == len(ANALYSIS)


def test_the_server_options_around_harmony() -> None:
    with pytest.raises(ValidationError, match="needs server.reasoning_parser: harmony"):
        ServerConfig(tool_call_parser="harmony")
    ServerConfig(tool_call_parser="harmony", reasoning_parser="harmony")
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": ' \
           b'{"name": "ping"}}], "tool_choice": "required"}'
    with pytest.raises(BadRequest, match="not supported with server.tool_call_parser harmony") as e:
        parse_body(body, True, "m", 4, "harmony", "harmony")
    assert e.value.param == "tool_choice"
    req = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")], tools=[pb.Tool(name="ping")],
                             tool_choice=pb.ToolChoice(function="ping"))
    with pytest.raises(InvalidArgument, match="not supported"):
        grpc_tool_mode(req, "harmony")
    reqs, opts = parse_body(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}', True, "m", 4, None, "harmony")
    assert opts.harmony and opts.reasoning and reqs[0].skip_special_tokens is False  # its markers keep their text
    reqs, _ = parse_body(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "skip_special_tokens": true}', True,
                         "m", 4, None, "harmony")
    assert reqs[0].skip_special_tokens is True  # unless the request says


@pytest.fixture(scope="module")
def served() -> Any:
    """A router (both fronts, reasoning and tool parsers harmony) over a worker that answers the
    analysis, a preamble and a call, as gpt-oss's tokenizer has them (markers one special token each)."""
    tok = tiny_tokenizer()
    tok.add_tokens(MARKERS, special_tokens=True)
    ids = tok.encode(ANALYSIS + PREAMBLE + CALL.removesuffix("<|call|>"), add_special_tokens=False)
    with ScriptedRouter(ids, tok, tool_call_parser="harmony", reasoning_parser="harmony") as router:
        yield router.stub, router.http_port, tok


def test_both_fronts_split_a_served_harmony_answer(served: Any) -> None:
    """The markers keep their text (skip_special_tokens false for these answers), the EOS has none;
    gRPC's parsed and OpenAI's message carry the same reasoning, content and call, unary and streamed."""
    stub, http_port, tok = served
    req = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="weather?")], max_tokens=400,
                             tools=[pb.Tool(name="get_weather", parameters='{"type": "object"}')])
    unary = stub.Generate(req, timeout=30)
    assert unary.text == ANALYSIS + PREAMBLE + CALL.removesuffix("<|call|>") and unary.finish_reason == "tool_calls"
    assert unary.parsed.reasoning == "The user wants the weather. Call it." and unary.parsed.content == "Checking now."
    assert [(c.name, c.arguments) for c in unary.parsed.tool_calls] == [("get_weather", '{"city": "Oslo"}')]
    assert unary.usage.reasoning_tokens == len(tok.encode(ANALYSIS, add_special_tokens=False)) == len(ANALYSIS) - 26
    streamed = pb.ParsedAnswer()
    for msg in stub.GenerateStream(req, timeout=30):
        streamed.reasoning += msg.parsed.reasoning
        streamed.content += msg.parsed.content
        for d in msg.parsed.tool_calls:
            if d.name:
                streamed.tool_calls.add(name=d.name)
            streamed.tool_calls[d.index].arguments += d.arguments
    assert (streamed.reasoning, streamed.content) == (unary.parsed.reasoning, unary.parsed.content)
    assert [(c.name, c.arguments) for c in streamed.tool_calls] == [("get_weather", '{"city": "Oslo"}')]
    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="-", max_retries=0)
    r = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "weather?"}], max_tokens=400,
                                    tools=[{"type": "function", "function": {"name": "get_weather"}}])
    m = r.choices[0].message
    assert (m.content, r.choices[0].finish_reason) == ("Checking now.", "tool_calls")
    assert getattr(m, "reasoning_content") == "The user wants the weather. Call it."
    assert [(c.function.name, c.function.arguments) for c in m.tool_calls or []] == [("get_weather", '{"city": "Oslo"}')]
    bare = stub.Generate(pb.GenerateRequest(messages=req.messages, max_tokens=400), timeout=30)  # no tools
    assert (bare.parsed.reasoning, bare.parsed.content) == (unary.parsed.reasoning, 'Checking now.{"city": "Oslo"}')
    plain = stub.Generate(pb.GenerateRequest(messages=req.messages, max_tokens=400, skip_special_tokens=True), timeout=30)
    assert plain.text.startswith("analysisThe user") and plain.parsed.content == plain.text  # asked: no markers
    with pytest.raises(grpc.RpcError, match="thinking_token_budget"):
        stub.Generate(pb.GenerateRequest(messages=req.messages, thinking_token_budget=5), timeout=30)
