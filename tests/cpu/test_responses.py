"""POST /v1/responses (router/responses_api.py, router/responses_front.py): a Responses request as
the chat request it stands for, its answer as output items, unary and as typed events — read by the
official `openai` client. The served answers come from a scripted worker (tests/cpu/scripted.py);
the tiny model's are in tests/cpu/test_http_api.py."""
from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from engine.tiny import tiny_tokenizer
from router.errors import BadRequest
from router.responses_api import Items, chat_body
from router.tool_calls import Delta
from tests.cpu.scripted import ScriptedRouter
from tests.cpu.test_harmony import ANALYSIS, CALL, MARKERS, PREAMBLE

WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}


def test_a_request_becomes_the_chat_body_it_stands_for() -> None:
    body = {"model": "m", "instructions": "be brief", "max_output_tokens": 50, "temperature": 0.5,
            "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}},
            "reasoning": {"effort": "low"}, "store": False, "metadata": {"k": "v"},
            "input": [{"role": "user", "content": "weather?"},
                      {"type": "reasoning", "id": "rs_1", "summary": [],
                       "content": [{"type": "reasoning_text", "text": "call it"}]},
                      {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                      {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                      {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "and "},
                                                                      {"type": "input_text", "text": "tomorrow?"}]}]}
    assert chat_body(body) == {
        "model": "m", "max_tokens": 50, "temperature": 0.5, "reasoning_effort": "low",
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                                                   "strict": True}},
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "weather?"},
                     {"role": "assistant", "content": "", "reasoning": "call it", "tool_calls": [
                         {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                     {"role": "user", "content": "and tomorrow?"}]}
    assert chat_body({"model": "m", "input": "hi", "stream_options": {"include_obfuscation": False},
                      "include": ["reasoning.encrypted_content"]}) == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("fields, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),  # nothing is stored
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),  # built-in tools
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]"),
    ({"input": []}, "input"),
    ({"truncation": "auto"}, "truncation"),
    ({"seed": 3}, "seed"),  # not a Responses field
    ({"top_logprobs": 2}, "top_logprobs"),  # not carried into output_text's logprobs here
])
def test_what_has_no_chat_equivalent_is_refused_naming_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as e:
        chat_body({"model": "m", "input": "hi", **fields})
    assert e.value.param == param


def test_items_open_where_the_kind_of_text_changes() -> None:
    items = Items()
    events = items.add("let me", Delta()) + items.add(" see", Delta("It is"))
    events += items.add("", Delta(" sunny", [{"index": 0, "id": "c1", "type": "function",
                                              "function": {"name": "f", "arguments": '{"a"'}}]))
    events += items.add("", Delta(calls=[{"index": 0, "function": {"arguments": ": 1}"}}])) + items.close()
    assert [e["type"].removeprefix("response.") for e in events] == [
        "output_item.added", "reasoning_text.delta", "reasoning_text.delta", "reasoning_text.done", "output_item.done",
        "output_item.added", "content_part.added", "output_text.delta", "output_text.delta", "output_text.done",
        "content_part.done", "output_item.done", "output_item.added", "function_call_arguments.delta",
        "function_call_arguments.delta", "function_call_arguments.done", "output_item.done"]
    assert [i["type"] for i in items.items] == ["reasoning", "message", "function_call"]
    assert items.items[0]["content"][0]["text"] == "let me see" and items.items[1]["content"][0]["text"] == "It is sunny"
    assert (items.items[2]["call_id"], items.items[2]["arguments"]) == ("c1", '{"a": 1}')
    assert [e["output_index"] for e in events if e["type"].endswith("item.added")] == [0, 1, 2]


@pytest.fixture(scope="module")
def router() -> Any:
    tok = tiny_tokenizer()
    tok.add_tokens(MARKERS, special_tokens=True)
    ids = tok.encode(ANALYSIS + PREAMBLE + CALL.removesuffix("<|call|>"), add_special_tokens=False)
    with ScriptedRouter(ids, tok, tool_call_parser="harmony", reasoning_parser="harmony") as r:
        yield r


def test_a_served_answer_as_output_items_unary_and_streamed(router: Any) -> None:
    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{router.http_port}/v1", api_key="-", max_retries=0)
    r = oai.responses.create(model="tiny", input="weather in Oslo?", tools=[WEATHER])  # type: ignore[list-item]
    assert r.status == "completed" and r.id.startswith("resp_") and r.object == "response"
    assert [i.type for i in r.output] == ["reasoning", "message", "function_call"]
    assert r.output[0].content[0].text == "The user wants the weather. Call it."  # type: ignore[union-attr,index]
    assert r.output_text == "Checking now."
    call = r.output[2]
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Oslo"}')  # type: ignore[union-attr]
    assert r.usage is not None and r.usage.output_tokens_details.reasoning_tokens == 11 + len("The user wants the weather. Call it.")
    events = list(oai.responses.create(model="tiny", input="weather in Oslo?", tools=[WEATHER], stream=True))  # type: ignore[list-item]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    done = events[-1].response  # type: ignore[union-attr]
    assert [i.type for i in done.output] == ["reasoning", "message", "function_call"] and done.output_text == "Checking now."
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")  # type: ignore[union-attr]
    assert (text, args) == ("Checking now.", '{"city": "Oslo"}')
    # without tools, the call's body is text (harmony: a call to no tool of the request)
    bare = oai.responses.create(model="tiny", input=[{"role": "user", "content": "weather?"}])
    assert [i.type for i in bare.output] == ["reasoning", "message"] and bare.output_text == 'Checking now.{"city": "Oslo"}'


@pytest.mark.parametrize("body, param", [
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),  # the chat path's refusal, renamed
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "wat"}}}},
     "text.format"),
    ({"input": "hi", "tools": [WEATHER], "tool_choice": "required"}, "tool_choice"),  # harmony: refused
    ({"input": "hi", "previous_response_id": "resp_x"}, "previous_response_id"),
])
def test_refusals_are_http_400_naming_the_responses_field(router: Any, body: dict[str, Any], param: str) -> None:
    r = httpx.post(f"http://127.0.0.1:{router.http_port}/v1/responses", json={"model": "tiny", **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert json.loads(r.text)["error"]["param"] == param
