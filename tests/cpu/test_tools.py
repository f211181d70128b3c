"""Tool calling: the request side (router/tools.py: tools, tool_choice, tool messages, the chat
template) and the answer side (router/tool_calls.py: text → content and tool_calls, streamed and whole)."""
from __future__ import annotations

import json
from typing import Any

import pytest

from engine.structured import grammar_error, grammar_text
from engine.tiny import tiny_tokenizer
from protos.pdserve.v1 import generation_pb2 as pb
from router.chat import chat_prompt_ids
from router.config import LimitsConfig
from router.errors import BadRequest, InvalidArgument
from router.answer_split import ChatSplit
from router.openai_requests import parse_body
from router.structured import _llguidance_tokenizer
from router.tool_calls import Delta, merged
from router.tool_parsers import reader
from router.tools import ToolMode
from router.validation import validate

TOK = tiny_tokenizer()
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
           "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "ping"}}]
MSGS = [{"role": "user", "content": "weather in Paris?"}]
AUTO = ToolMode("auto", ("get_weather", "ping"), parser="hermes")
CALLS = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>\n')


def whole(mode: ToolMode, text: str, finish: str) -> tuple[str | None, list[dict[str, Any]], str]:
    """A unary answer, read as the front reads one (fed whole): its content (None when it is only
    calls), its calls, its finish_reason."""
    _, d, finish = ChatSplit(mode, reasoning=False).feed(text, finish)
    calls = merged(d.calls)
    return (d.content or None) if calls else d.content, calls, finish


def _streamed(mode: ToolMode, text: str, step: int) -> tuple[str, list[dict[str, Any]]]:
    """`text` fed `step` characters at a time: the content and the call deltas merged by index."""
    r = reader(mode)
    d = Delta()
    for i in range(0, len(text), step):
        d += r.feed(text[i:i + step])
    d += r.end()
    calls: list[dict[str, Any]] = []
    for c in d.calls:
        if c["index"] == len(calls):
            assert c["id"] and c["type"] == "function"  # a call's first delta names it
            calls.append({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
        else:
            assert "id" not in c and "name" not in c["function"]
            calls[c["index"]]["arguments"] += c["function"]["arguments"]
    return d.content, calls


def _names_args(calls: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


@pytest.mark.parametrize("step", [1, 2, 5, 11, 1000])
def test_hermes_blocks_become_calls_however_the_text_is_cut(step: int) -> None:
    content, calls, finish = whole(AUTO, CALLS, "stop")
    assert content == "Let me look." and finish == "tool_calls"
    assert _names_args(calls) == [("get_weather", '{"city": "Paris"}'), ("ping", "{}")]
    assert len({c["id"] for c in calls}) == 2
    got_content, got_calls = _streamed(AUTO, CALLS, step)
    assert got_content == content and [(c["name"], c["arguments"]) for c in got_calls] == _names_args(calls)


@pytest.mark.parametrize("text, content, calls, finish", [
    ("Hello there\n", "Hello there\n", [], "stop"),  # no block: the text as it is
    ("Hello <tool_c", "Hello <tool_c", [], "stop"),  # a tail that only looked like a block's start
    ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>',  # not a tool of the request
     '<tool_call>{"name": "nope", "arguments": {}}</tool_call>', [], "stop"),
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", [], "stop"),
    ('<tool_call>{"name": "ping", "arguments": {"a": [1]}}', None, [("ping", '{"a": [1]}')], "tool_calls"),  # unclosed
    ('<tool_call>{"name": "ping", "argu', '<tool_call>{"name": "ping", "argu', [], "length"),  # cut
    ('<tool_call>{"name": "ping", "parameters": {"x": "é"}}</tool_call>', None, [("ping", '{"x": "é"}')],
     "tool_calls"),
])
def test_hermes_edges(text: str, content: str | None, calls: list[tuple[str, str]], finish: str) -> None:
    got = whole(AUTO, text, "length" if finish == "length" else "stop")
    assert (got[0], _names_args(got[1]), got[2]) == (content, calls, finish)
    streamed_content, streamed_calls = _streamed(AUTO, text, 3)
    assert streamed_content == (content or "") and [(c["name"], c["arguments"]) for c in streamed_calls] == calls


def _reads(mode: ToolMode, text: str, content: str | None, calls: list[tuple[str, str]], finish: str) -> None:
    """A unary answer of `text` has this content, these calls and finish_reason; streamed 1, 3, 4 or
    50 characters a message, the same content and calls."""
    got = whole(mode, text, finish)
    assert (got[0], _names_args(got[1]), got[2]) == (content, calls, finish)
    for step in (1, 3, 4, 50):
        streamed_content, streamed_calls = _streamed(mode, text, step)
        assert streamed_content == (content or "") and [(c["name"], c["arguments"]) for c in streamed_calls] == calls


LLAMA = ToolMode("auto", ("get_weather", "ping"), parser="llama3_json")


@pytest.mark.parametrize("text, content, calls, finish", [
    ('{"name": "get_weather", "parameters": {"city": "Lima"}}', None, [("get_weather", '{"city": "Lima"}')],
     "tool_calls"),
    ('<|python_tag|>{"name": "ping", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "{;}"}}', None,
     [("ping", "{}"), ("get_weather", '{"city": "{;}"}')], "tool_calls"),
    ("It is sunny {really}", "It is sunny {really}", [], "stop"),  # starts as text: all text
    ('{"name": "nope", "parameters": {}}', '{"name": "nope", "parameters": {}}', [], "stop"),
    ('{"name": "ping", "parameters": {}}; {"name": "get_wea', '{"name": "get_wea', [("ping", "{}")], "length"),
    ('{"name": "get_wea', '{"name": "get_wea', [], "length"),
])
def test_llama3_json_calls(text: str, content: str | None, calls: list[tuple[str, str]], finish: str) -> None:
    _reads(LLAMA, text, content, calls, finish)


MISTRAL = ToolMode("auto", ("get_weather", "ping"), parser="mistral")


@pytest.mark.parametrize("text, content, calls, finish", [
    ('Sure.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "ping", "arguments": {}}]',
     "Sure.", [("get_weather", '{"city": "Paris"}'), ("ping", "{}")], "tool_calls"),  # before v11: a list
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "{Paris]"}[TOOL_CALLS]ping[ARGS]{}', None,  # v11 and later
     [("get_weather", '{"city": "{Paris]"}'), ("ping", "{}")], "tool_calls"),
    ('[TOOL_CALLS]ping[CALL_ID]a1b2c3d4e[ARGS]{"x": [1]}', None, [("ping", '{"x": [1]}')], "tool_calls"),
    ('[TOOL_CALLS]ping{}', None, [("ping", "{}")], "tool_calls"),  # [ARGS] left out
    ("No tools [TOOL needed.", "No tools [TOOL needed.", [], "stop"),  # a tail that only looked like the tag
    ('[TOOL_CALLS]nope[ARGS]{"a": 1}', '[TOOL_CALLS]nope[ARGS]{"a": 1}', [], "stop"),  # not a tool: as written
    ('[TOOL_CALLS]ping[ARGS]{}[TOOL_CALLS]get_weather[ARGS]{"city": "Li', None,
     [("ping", "{}"), ("get_weather", '{"city": "Li')], "length"),  # cut mid-arguments: the call as made
    ('[TOOL_CALLS]ping[ARGS]{}[TOOL_CALLS]get_weather[ARGS]', '[TOOL_CALLS]get_weather[ARGS]', [("ping", "{}")],
     "length"),  # cut before the arguments: text
    ('[TOOL_CALLS][{"name": "ping", "arguments": {}}, {"name": "get_', '{"name": "get_', [("ping", "{}")], "length"),
])
def test_mistral_calls(text: str, content: str | None, calls: list[tuple[str, str]], finish: str) -> None:
    _reads(MISTRAL, text, content, calls, finish)


GRANITE = ToolMode("auto", ("get_weather", "ping"), parser="granite")


@pytest.mark.parametrize("text, content, calls, finish", [
    ('<|tool_call|>[{"arguments": {"city": "Paris"}, "name": "get_weather"}, {"name": "ping", "arguments": {}}]',
     None, [("get_weather", '{"city": "Paris"}'), ("ping", "{}")], "tool_calls"),  # its keys in either order
    ('Let me check.<|tool_call|>[{"name": "ping", "arguments": {}}]', "Let me check.", [("ping", "{}")], "tool_calls"),
    ("It is sunny <|tool in Paris.", "It is sunny <|tool in Paris.", [], "stop"),  # only looked like the tag
    ('<|tool_call|>[{"name": "nope", "arguments": {}}]', '{"name": "nope", "arguments": {}}', [], "stop"),
])
def test_granite_calls(text: str, content: str | None, calls: list[tuple[str, str]], finish: str) -> None:
    _reads(GRANITE, text, content, calls, finish)


PYTHONIC = ToolMode("auto", ("get_weather", "ping"), parser="pythonic")


@pytest.mark.parametrize("text, content, calls, finish", [
    ("[get_weather(city='Paris', unit=\"c\"), ping()]", None,
     [("get_weather", '{"city": "Paris", "unit": "c"}'), ("ping", "{}")], "tool_calls"),
    ('<|python_start|>[get_weather(city="Oslo", days=-2, on=true, x=[1, {"a": None}])]<|python_end|>', None,
     [("get_weather", '{"city": "Oslo", "days": -2, "on": true, "x": [1, {"a": null}]}')], "tool_calls"),  # Llama 4
    ("[1] is where I read it.", "[1] is where I read it.", [], "stop"),  # a list, not of calls: content
    ("It is sunny [today]", "It is sunny [today]", [], "stop"),  # starts as text
    ("[nope()]", "[nope()]", [], "stop"),  # not a tool
    ('[get_weather("Paris")]', '[get_weather("Paris")]', [], "stop"),  # positional: not a call we can name
    ("[get_weather(city=open('x'))]", "[get_weather(city=open('x'))]", [], "stop"),  # not a literal
    ('[get_weather(city="Pa', '[get_weather(city="Pa', [], "length"),
    ("[ping(x='a]')] Then I will read it.", "Then I will read it.", [("ping", '{"x": "a]"}')], "tool_calls"),  # after
    ("[1, 2] and [ping()]", "[1, 2] and [ping()]", [], "stop"),  # the first list is not calls: all content
])
def test_pythonic_calls(text: str, content: str | None, calls: list[tuple[str, str]], finish: str) -> None:
    _reads(PYTHONIC, text, content, calls, finish)


TYPED = {"type": "object", "properties": {"path": {"type": "string"}, "n": {"type": "integer"},
                                          "on": {"type": "boolean"}, "tags": {"type": "array"}, "x": {"type": ["number", "null"]}}}
QWEN = ToolMode("auto", ("write", "ping"), parser="qwen3_coder", schemas=(json.dumps(TYPED), ""))
XML = ('Writing it.\n<tool_call>\n<function=write>\n<parameter=path>\na "b".py\n</parameter>\n<parameter=n>\n3\n'
       '</parameter>\n<parameter=on>\nTrue\n</parameter>\n<parameter=tags>\n["a", 1]\n</parameter>\n'
       '<parameter=body>\nline 1\n\n  </para\n</parameter>\n<parameter=x>\nnull\n</parameter>\n</function>\n</tool_call>\n'
       '<tool_call>\n<function=ping>\n</function>\n</tool_call>')


@pytest.mark.parametrize("text, content, calls, finish", [
    (XML, "Writing it.", [("write", json.dumps({"path": 'a "b".py', "n": 3, "on": True, "tags": ["a", 1],
                                                 "body": "line 1\n\n  </para", "x": None})), ("ping", "{}")], "tool_calls"),
    # unclosed parameters end at the next tag; an unclosed block at the answer's end
    ("<tool_call><function=write><parameter=n>7<parameter=path>p</function>", None,
     [("write", '{"n": 7, "path": "p"}')], "tool_calls"),
    ("<tool_call>\n<function=write>\n<parameter=n>\nseven\n</parameter>", None, [("write", '{"n": "seven"}')], "tool_calls"),
    ("<tool_call><function=nope><parameter=a>1</parameter></function></tool_call>",  # not a tool: as written
     "<tool_call><function=nope><parameter=a>1</parameter></function></tool_call>", [], "stop"),
    ('<tool_call>{"name": "ping", "arguments": {}}</tool_call>', '<tool_call>{"name": "ping", "arguments": {}}</tool_call>',
     [], "stop"),  # hermes's JSON is not this parser's
    ("<tool_call><function=write><parameter=path>src/lo", None, [("write", '{"path": "src/lo"}')], "length"),  # cut
    ("<tool_call><function=wri", "<tool_call><function=wri", [], "length"),  # cut before its name
    ("<tool_call><function=write><paramete[r=on>1</parameter><parameter=n>2</parameter></function></tool_call>", None,
     [("write", '{"n": 2}')], "tool_calls"),  # a broken tag is skipped, streamed or not
])
def test_qwen3_coder_xml_calls(text: str, content: str | None, calls: list[tuple[str, str]], finish: str) -> None:
    _reads(QWEN, text, content, calls, finish)
    for step in (1, 3, 4, 50):  # every stream's arguments read as JSON, and as the unary answer's
        assert [json.loads(c["arguments"]) for c in _streamed(QWEN, text, step)[1]] == [json.loads(a) for _, a in calls]


GLM = ToolMode("auto", ("write", "ping"), parser="glm45", schemas=(json.dumps(TYPED), ""))


@pytest.mark.parametrize("text, content, calls, finish", [
    ('Sure.<tool_call>write\n<arg_key>path</arg_key>\n<arg_value>a "b".py</arg_value>\n<arg_key>n</arg_key>\n'
     '<arg_value>3</arg_value>\n</tool_call><tool_call>ping\n</tool_call>', "Sure.",
     [("write", '{"path": "a \\"b\\".py", "n": 3}'), ("ping", "{}")], "tool_calls"),
    ("<tool_call>ping</tool_call>", None, [("ping", "{}")], "tool_calls"),  # the block's end ends the name
    ("<tool_call>write<arg_key>tags</arg_key><arg_value>[1]<arg_key>n</arg_key><arg_value>x</arg_value></tool_call>",
     None, [("write", '{"tags": [1], "n": "x"}')], "tool_calls"),  # unclosed: to the next key; not a number: text
    ("<tool_call>nope\n<arg_key>a</arg_key></tool_call>", "<tool_call>nope\n<arg_key>a</arg_key></tool_call>", [], "stop"),
    ("<tool_call>write\n<arg_key>path</arg_key><arg_value>src/l", None, [("write", '{"path": "src/l"}')], "length"),
])
def test_glm45_calls(text: str, content: str | None, calls: list[tuple[str, str]], finish: str) -> None:
    _reads(GLM, text, content, calls, finish)


def test_qwen3_coder_reads_values_by_the_requests_schemas() -> None:
    """The HTTP request's tools reach the parser: a value is typed by its tool's parameters."""
    tools = [{"type": "function", "function": {"name": "write", "parameters": TYPED}}, TOOLS[1]]
    _, opts = _chat("qwen3_coder", tools=tools)
    text = "<tool_call><function=write><parameter=n>3</parameter><parameter=path>3</parameter></function></tool_call>"
    assert _names_args(whole(opts.tools, text, "stop")[1]) == [("write", '{"n": 3, "path": "3"}')]


def test_a_qwen3_coder_string_streams_as_written() -> None:
    r = reader(QWEN)
    head = r.feed("<tool_call>\n<function=write>\n<parameter=path>\n")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in head.calls] == [("write", '{"path": "')]
    assert r.feed('dir/"a').calls == [{"index": 0, "function": {"arguments": 'dir/\\"a'}}]
    assert r.feed(".py\n</param").calls == [{"index": 0, "function": {"arguments": ".py"}}]  # the layout's newline held
    assert r.feed("eter>\n<parameter=n>\n12").calls == [{"index": 0, "function": {"arguments": '", "n": '}}]
    assert (r.feed("\n</parameter></function></tool_call>") + r.end()).calls == [
        {"index": 0, "function": {"arguments": "12}"}}]


DEEPSEEK = ToolMode("auto", ("get_weather", "ping"), parser="deepseek_v3")
DS = ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>")


@pytest.mark.parametrize("text, content, calls, finish", [
    ("Checking.{0}{1}function{2}get_weather\n```json\n{{\"city\": \"{{Oslo}}\"}}\n```{3}{1}function{2}ping\n```json\n"
     "{{}}\n```{3}{4}", "Checking.", [("get_weather", '{"city": "{Oslo}"}'), ("ping", "{}")], "tool_calls"),  # V3, R1
    ("{0}{1}get_weather{2}{{\"city\": \"Lima\"}}{3}{4} Done.", " Done.", [("get_weather", '{"city": "Lima"}')],
     "tool_calls"),  # V3.1; text after the section is content
    ("{0}{1}nope{2}{{}}{3}{4}", "{1}nope{2}{{}}{3}", [], "stop"),  # not a tool: the call as written
    ("{0}{1}get_weather{2}{{\"city\": \"Li", None, [("get_weather", '{"city": "Li')], "length"),  # cut mid-arguments
    ("{0}{1}get_wea", "{1}get_wea", [], "length"),  # cut before them
    ("No calls <｜tool", "No calls <｜tool", [], "stop"),
])
def test_deepseek_v3_calls(text: str, content: str | None, calls: list[tuple[str, str]], finish: str) -> None:
    _reads(DEEPSEEK, text.format(*DS), content.format(*DS) if content else content, calls, finish)


def test_kimi_k2_calls_keep_the_models_ids() -> None:
    text = ("Let me see.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
            '{"city": "Oslo"}<|tool_call_end|><|tool_call_begin|>functions.ping:1<|tool_call_argument_begin|>{}'
            "<|tool_call_end|><|tool_calls_section_end|>")
    mode = ToolMode("auto", ("get_weather", "ping"), parser="kimi_k2")
    _reads(mode, text, "Let me see.", [("get_weather", '{"city": "Oslo"}'), ("ping", "{}")], "tool_calls")
    assert [c["id"] for c in whole(mode, text, "stop")[1]] == ["functions.get_weather:0", "functions.ping:1"]


PARSED = {"hermes": CALLS, "llama3_json": '{"name": "get_weather", "parameters": {"city": "Lima"}}; {"name": "ping", '
          '"parameters": {}}', "mistral": '[TOOL_CALLS]get_weather[ARGS]{"city": "{Paris]"}[TOOL_CALLS]ping[ARGS]{}',
          "granite": '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Lima"}}, {"name": "ping", '
          '"arguments": {}}]', "pythonic": "[get_weather(city='Paris', unit=\"c\"), ping()]", "qwen3_coder": XML,
          "glm45": "Ok.<tool_call>write\n<arg_key>path</arg_key>\n<arg_value>a.py</arg_value>\n<arg_key>n</arg_key>"
          "<arg_value>2</arg_value>\n</tool_call><tool_call>ping\n</tool_call>",
          "deepseek_v3": "Hm.{0}{1}function{2}get_weather\n```json\n{{\"city\": \"{{Oslo}}\"}}\n```{3}{1}ping{2}{{}}{3}{4} ok"
          .format(*DS), "kimi_k2": 'Hi<|tool_calls_section_begin|><|tool_call_begin|>functions.ping:0'
          '<|tool_call_argument_begin|>{"a": "}"}<|tool_call_end|><|tool_calls_section_end|>'}


@pytest.mark.parametrize("parser", sorted(PARSED))
def test_every_parser_streams_what_it_answers_whole_on_broken_text(parser: str) -> None:
    """Answers cut, or with a character put in or a span taken out: read whole and streamed 1, 2,
    3 or 7 characters a message, the same content and calls, and no exception."""
    import random

    rng, text = random.Random(parser), PARSED[parser]
    for parallel in (True, False):
        mode = ToolMode("auto", ("get_weather", "ping", "write"), parser=parser, parallel=parallel,
                        schemas=("", "", json.dumps(TYPED)))
        for _ in range(150):
            i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
            broken = rng.choice([text[:i], text[:i] + rng.choice('"{}<\\ \n[]x') + text[i:], text[:i] + text[j:]])
            for finish in ("stop", "length"):
                content, calls, _ = whole(mode, broken, finish)
                for step in (1, 2, 3, 7):
                    assert _streamed(mode, broken, step) == (content or "", [
                        {"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]), broken


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    _, calls, _ = whole(ToolMode("auto", AUTO.names, parser="hermes", parallel=False), CALLS, "stop")
    assert _names_args(calls) == [("get_weather", '{"city": "Paris"}')]
    text = '{"name": "ping", "parameters": {}}; {"name": "get_weather", "parameters": {}}'
    assert _names_args(whole(ToolMode("auto", AUTO.names, parser="llama3_json", parallel=False), text, "stop")[1]) == [
        ("ping", "{}")]
    for parser, text in [("mistral", "[TOOL_CALLS]ping{}[TOOL_CALLS]get_weather{}"), ("pythonic", "[ping(), get_weather()]"),
                         ("qwen3_coder", "<tool_call><function=ping></function></tool_call><tool_call>"
                                         "<function=get_weather><parameter=city>Oslo</parameter></function></tool_call>"),
                         ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>ping<｜tool▁sep｜>{}<｜tool▁call▁end｜>"
                                         "<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>")]:
        content, calls, _ = whole(ToolMode("auto", AUTO.names, parser=parser, parallel=False), text, "stop")
        assert _names_args(calls) == [("ping", "{}")] and content is None, parser  # the second is dropped, not text


@pytest.mark.parametrize("mode, text", [
    (AUTO, 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Par", "unit": "c"}}\n</tool_call>'),
    (LLAMA, '{"name": "get_weather", "parameters": {"city": "Par", "unit": "c"}}'),
    (MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Par", "unit": "c"}}]'),
    (MISTRAL, '[TOOL_CALLS]get_weather[ARGS]{"city": "Par", "unit": "c"}'),
    (ToolMode("required", AUTO.names), '[{"name": "get_weather", "parameters": {"city": "Par", "unit": "c"}}]'),
])
def test_a_calls_arguments_stream_as_made(mode: ToolMode, text: str) -> None:
    """The call goes out (id, name) once its arguments open, then each piece of them as it comes
    (OpenAI's deltas), not the call whole once it closes; cut mid-arguments, it keeps what it has."""
    r = reader(mode)
    opened = text.index('{"city"')
    head = r.feed(text[:opened + 1])
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in head.calls] == [("get_weather", "{")]
    assert head.calls[0]["id"].startswith("call_") and head.content in ("", "Sure.")
    piece = r.feed('"city": "Par')
    assert piece.calls == [{"index": 0, "function": {"arguments": '"city": "Par'}}]
    rest = r.feed(text[opened + 13:]) + r.end()
    assert "".join(c["function"]["arguments"] for c in rest.calls) == '", "unit": "c"}' and not rest.content
    assert r.finish_reason("stop") == "tool_calls"
    content, calls, finish = whole(mode, text[:opened + 13], "length")
    assert _names_args(calls) == [("get_weather", '{"city": "Par')] and finish == "length"
    assert content == ("Sure." if mode is AUTO else None)


@pytest.mark.parametrize("text, arguments", [
    ('{"arguments": {"a": 1}, "name": "ping"}', '{"a": 1}'),  # name last: read once the object closes
    ('{"name": "ping", "arguments": "{\\"a\\": 1}"}', '{"a": 1}'),  # arguments as JSON text
])
def test_a_call_of_another_shape_is_read_whole(text: str, arguments: str) -> None:
    r = reader(AUTO)
    assert r.feed("<tool_call>" + text[:-1]).calls == []
    assert _names_args((r.feed(text[-1:] + "</tool_call>") + r.end()).calls) == [("ping", arguments)]


def test_required_calls_go_out_as_each_object_opens() -> None:
    mode = ToolMode("required", AUTO.names)
    text = '[{"name": "get_weather", "parameters": {"city": "a]}\\"{"}}, {"name": "ping", "parameters": {}}]'
    r = reader(mode)
    cut = text.index("}, {") + 1
    first = r.feed(text[:cut])  # the first object has closed: its call is out before the rest exists
    assert _names_args(first.calls) == [("get_weather", '{"city": "a]}\\"{"}')]
    rest = r.feed(text[cut:]) + r.end()
    assert _names_args(rest.calls) == [("ping", "{}")] and r.finish_reason("stop") == "tool_calls"
    for step in (1, 4, 100):
        assert [(c["name"], c["arguments"]) for c in _streamed(mode, text, step)[1]] == _names_args(first.calls + rest.calls)
    content, calls, finish = whole(mode, text[:30], "length")  # cut mid-call: the open call's text is kept
    assert (content, calls, finish) == (text[1:30], [], "length")


def test_a_named_function_streams_its_arguments_as_made() -> None:
    mode = ToolMode("named", AUTO.names, name="get_weather")
    r = reader(mode)
    head, tail = r.feed('{"city": '), r.feed('"Oslo"}')
    assert head.calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": '} and head.calls[0]["id"]
    assert tail.calls == [{"index": 0, "function": {"arguments": '"Oslo"}'}}] and r.end().calls == []
    assert r.finish_reason("stop") == "stop"  # as OpenAI answers a forced function
    content, calls, finish = whole(mode, '{"city": "Oslo"}', "stop")
    assert content is None and finish == "stop" and _names_args(calls) == [("get_weather", '{"city": "Oslo"}')]


# -- the request side ------------------------------------------------------------------------------
def _chat(parser: str | None = "hermes", **fields: Any) -> tuple[pb.GenerateRequest, Any]:
    body = {"model": "m", "messages": MSGS, **fields}
    reqs, opts = parse_body(json.dumps(body).encode(), True, "m", 8, parser)
    return reqs[0], opts


def test_tool_choice_sets_what_the_answer_is() -> None:
    req, opts = _chat(tools=TOOLS)  # default with tools: auto, read by the parser
    assert opts.tools == ToolMode("auto", ("get_weather", "ping"), parser="hermes")
    assert [t.name for t in req.tools] == ["get_weather", "ping"] and json.loads(req.tools[0].parameters) == WEATHER
    assert req.tools[1].parameters == "" and not req.HasField("structured")
    assert req.HasField("skip_special_tokens") and not req.skip_special_tokens  # the parser's markers are kept
    req, opts = _chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(req.structured.json_schema) == WEATHER and opts.tools.kind == "named"
    assert opts.structured_param == "tools[0].function.parameters"
    req, opts = _chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    schema = json.loads(req.structured.json_schema)
    assert schema["maxItems"] == 1 and [c["properties"]["name"] for c in schema["items"]["anyOf"]] == [
        {"const": "get_weather"}, {"const": "ping"}]
    req, opts = _chat(tools=TOOLS, tool_choice="none")
    assert opts.tools is None and len(req.tools) == 2 and not req.HasField("structured")  # the template still sees them
    req, opts = _chat(parser=None, tools=TOOLS, tool_choice="required")
    assert opts.tools.kind == "required"


def test_the_grammars_of_tool_choice_compile_and_hold_the_tools_schemas() -> None:
    ll = _llguidance_tokenizer(TOK)
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}},
                   {"type": "function", "function": {"name": "ping"}}):
        req, _ = _chat(tools=TOOLS, tool_choice=choice)
        assert grammar_error(grammar_text("json_schema", req.structured.json_schema), ll) == ""


@pytest.mark.parametrize("fields, parser, param", [
    (dict(tools=TOOLS), None, "tool_choice"),  # auto needs a parser
    (dict(tool_choice="required"), "hermes", "tool_choice"),  # no tools
    (dict(tools=TOOLS, tool_choice="sometimes"), "hermes", "tool_choice"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "hermes",
     "tool_choice.function.name"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "hermes", "response_format"),
    (dict(tools=TOOLS, parallel_tool_calls="yes"), "hermes", "parallel_tool_calls"),
    (dict(tools={"get_weather": {}}), "hermes", "tools"),
    (dict(tools=[{"type": "code_interpreter"}]), "hermes", "tools[0]"),
    (dict(tools=[{"type": "function", "function": {"name": "has space"}}]), "hermes", "tools[0].function.name"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": [1]}}]), "hermes",
     "tools[0].function.parameters"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "returns": {}}}]), "hermes", "tools[0].function.returns"),
    (dict(messages=[{"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": {}}}]}]),
     "hermes", "messages[0].tool_calls[0]"),
    (dict(messages=[{"role": "user", "content": "x", "tool_calls": []}]), "hermes", "messages[0].tool_calls"),
    (dict(messages=[{"role": "tool", "content": "22 C"}]), "hermes", "messages[0].tool_call_id"),
])
def test_bad_tool_fields_are_refused_naming_them(fields: dict[str, Any], parser: str | None, param: str) -> None:
    with pytest.raises(BadRequest) as e:
        _chat(parser, **fields)
    assert e.value.param == param, e.value.message


TEMPLATE = (  # a Hermes-style template: tools in the system turn, calls and results as their own turns
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }}:{{ t.function.parameters | tojson }};"
    "{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[{{ c.id }} {{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %}"
    "{% if m.tool_call_id %}(for {{ m.tool_call_id }}){% endif %}{% endfor %}<assistant>")


def test_tools_calls_and_results_reach_the_chat_template() -> None:
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    req, _ = _chat(tools=TOOLS, messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}])
    text = tok.decode(chat_prompt_ids(req, tok))
    assert text == ('<tools>get_weather:' + json.dumps(WEATHER) + ';ping:{"type": "object", "properties": {}, '
                    '"additionalProperties": false};</tools><user>weather?<assistant>[call_1 get_weather Oslo]'
                    '<tool>-3 C(for call_1)<assistant>')


@pytest.mark.parametrize("tools, field", [
    ([pb.Tool(name="a b")], "tools[0].name"),
    ([pb.Tool(name="f"), pb.Tool(name="f")], "tools[1].name"),
    ([pb.Tool(name="f", parameters="{")], "tools[0].parameters"),
    ([pb.Tool(name="f", parameters="[]")], "tools[0].parameters"),
])
def test_grpc_tools_are_checked_naming_the_field(tools: list[pb.Tool], field: str) -> None:
    req = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x")], tools=tools)
    with pytest.raises(InvalidArgument) as e:
        validate(req, TOK, LimitsConfig(), 4096)
    assert e.value.field == field


def test_grpc_tools_need_messages() -> None:
    with pytest.raises(InvalidArgument) as e:
        validate(pb.GenerateRequest(prompt="x", tools=[pb.Tool(name="f")]), TOK, LimitsConfig(), 4096)
    assert e.value.field == "tools"
