"""A reasoning model's thinking split out of chat answers (router/reasoning.py), alone and beside
tool calls (router/answer_split.ChatSplit)."""
from __future__ import annotations

import json
from typing import Any

import pytest

from engine.tiny import tiny_tokenizer
from router.chat import chat_prompt_ids
from router.errors import BadRequest
from router.answer_split import ChatSplit
from router.openai_requests import Options, parse_body
from router.reasoning import Thinking, prompt_opens_thinking, reasoning_tokens
from router.tool_calls import merged
from router.tools import ToolMode

TOK = tiny_tokenizer()


def _split(text: str, inside: bool, step: int) -> tuple[str, str]:
    t, reasoning, content = Thinking(inside), "", ""
    for i in range(0, len(text), step):
        r, c = t.feed(text[i:i + step])
        reasoning, content = reasoning + r, content + c
    r, c = t.end()
    return reasoning + r, content + c


@pytest.mark.parametrize("text, inside, reasoning, content", [
    ("<think>\nFirst, 2+2.\n</think>\n\nIt is 4.", False, "First, 2+2.\n", "It is 4."),  # Qwen 3: the answer opens it
    ("\nFirst, 2+2.</think>It is 4.", True, "First, 2+2.", "It is 4."),  # DeepSeek R1: the prompt opened it
    ("It is 4.", False, "", "It is 4."),  # no thinking
    ("  It is <think>4</think>", False, "", "  It is <think>4</think>"),  # a block after text is text
    ("<thinking>x</thinking>", False, "", "<thinking>x</thinking>"),
    ("still going </thi", True, "still going </thi", ""),  # cut by length inside: all reasoning
    ("<think>a</think>", False, "a", ""),
    ("  ", False, "", "  "),
])
@pytest.mark.parametrize("step", [1, 2, 3, 1000])
def test_thinking_splits_however_the_text_is_cut(text: str, inside: bool, reasoning: str, content: str,
                                                 step: int) -> None:
    assert _split(text, inside, step) == (reasoning, content)


def test_a_prompt_that_opens_a_think_block_is_seen() -> None:
    ids = TOK("<|im_start|> assistant <think>\n")["input_ids"]
    assert prompt_opens_thinking(ids, TOK)
    assert not prompt_opens_thinking(TOK("<|im_start|> assistant <think>\n\n</think>\n\n")["input_ids"], TOK)
    assert not prompt_opens_thinking(TOK("<|im_start|> assistant ")["input_ids"], TOK)


def _opts(**kw: Any) -> Options:
    return Options(chat=True, stream=False, include_usage=False, logprobs=False, **kw)


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_thinking_then_a_tool_call(step: int) -> None:
    text = '<think>need the weather</think>\n<tool_call>{"name": "w", "arguments": {"c": "Oslo"}}</tool_call>'
    split = ChatSplit(ToolMode("auto", ("w",), parser="hermes"), reasoning=True)
    reasoning, content, calls, finish = "", "", [], ""
    for i in range(0, len(text), step):
        last = i + step >= len(text)
        r, d, f = split.feed(text[i:i + step], "stop" if last else "")
        reasoning, content, calls, finish = reasoning + r, content + d.content, calls + d.calls, f or finish
    assert (reasoning, content, finish) == ("need the weather", "", "tool_calls")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in merged(calls)] == [("w", '{"c": "Oslo"}')]
    hidden = ChatSplit(None, reasoning=True, include_reasoning=False).feed("<think>x</think>y", "stop")
    assert hidden[0] == "" and hidden[1].content == "y"


def _chat(parser: str | None = "think", **fields: Any) -> tuple[Any, Options]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    reqs, opts = parse_body(json.dumps(body).encode(), True, "m", 8, "hermes", parser)
    return reqs[0], opts


def test_the_split_is_on_with_the_parser() -> None:
    assert _chat()[1].reasoning and _chat(response_format={"type": "json_object"})[1].reasoning
    assert not _chat(None)[1].reasoning
    assert not _chat(include_reasoning=False)[1].include_reasoning
    with pytest.raises(BadRequest) as e:
        _chat(include_reasoning="no")
    assert e.value.param == "include_reasoning"


def test_earlier_thinking_reaches_the_template() -> None:
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{% if m.reasoning_content %}[{{ m.reasoning_content }}]"
                         "{% endif %}{{ m.content }}{% endfor %}")
    for key in ("reasoning", "reasoning_content"):
        req, _ = _chat(messages=[{"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "4", key: "add them"},
                                 {"role": "user", "content": "and 3+3?"}])
        assert tok.decode(chat_prompt_ids(req, tok)) == "<user>2+2?<assistant>[add them]4<user>and 3+3?"
    tok.chat_template = tok.chat_template.replace("reasoning_content", "thinking")  # gpt-oss's template's name
    assert tok.decode(chat_prompt_ids(req, tok)) == "<user>2+2?<assistant>[add them]4<user>and 3+3?"


def test_reasoning_tokens_count_up_to_the_token_that_completes_the_close() -> None:
    ids = TOK("<think>why not</think>Yes.")["input_ids"]  # one token per byte
    assert reasoning_tokens(ids, TOK) == len("<think>why not</think>")
    assert reasoning_tokens(ids[:10], TOK) == 10  # never closed: all of it
    text = "<think>a b</think>c"
    for step in (1, 3, 100):  # streamed however the text and tokens come, or whole
        split = ChatSplit(None, reasoning=True, count=lambda i: reasoning_tokens(i, TOK))
        for k in range(0, len(text), step):
            piece = text[k:k + step]
            split.feed(piece, "stop" if k + step >= len(text) else "", TOK(piece)["input_ids"])
        assert split.reasoning_tokens == len("<think>a b</think>")
    plain = ChatSplit(None, reasoning=True, count=lambda i: reasoning_tokens(i, TOK))
    plain.feed("no thinking", "stop", TOK("no thinking")["input_ids"])
    assert plain.reasoning_tokens == 0
    assert ChatSplit(None, reasoning=False).feed("x", "stop", [5])[0] == "" and ChatSplit(None, False).reasoning_tokens is None


def test_reasoning_effort_reaches_the_template_and_a_bad_one_is_refused() -> None:
    """OpenAI's reasoning_effort, as vLLM takes it: a variable of the chat template (gpt-oss's reads
    it); chat_template_kwargs' own reasoning_effort wins; another value is a 400 naming it."""
    def body(**kw: Any) -> bytes:
        return json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], **kw}).encode()

    req = parse_body(body(reasoning_effort="low"), True, "m", 8)[0][0]
    tok = tiny_tokenizer()
    tok.chat_template = "{{ reasoning_effort | default('unset') }}:{{ messages[0]['content'] }}"
    assert tok.decode(chat_prompt_ids(req, tok)) == "low:x"
    both = parse_body(body(reasoning_effort="low", chat_template_kwargs={"reasoning_effort": "high"}), True, "m", 8)
    assert tok.decode(chat_prompt_ids(both[0][0], tok)) == "high:x"
    assert tok.decode(chat_prompt_ids(parse_body(body(), True, "m", 8)[0][0], tok)) == "unset:x"
    with pytest.raises(BadRequest) as e:
        parse_body(body(reasoning_effort="max"), True, "m", 8)
    assert e.value.param == "reasoning_effort"
