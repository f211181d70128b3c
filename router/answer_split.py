"""A chat answer's text → its thinking, content and tool calls, as the text comes: one ChatSplit per
choice, behind both fronts. The OpenAI front writes the parts as a message's or a delta's fields
(router/openai_answers.py); the gRPC front as `parsed` (ParsedAnswer / ParsedDelta, below).

  1. thinking first (router/reasoning.py, with server.reasoning_parser): text up to `</think>` is
     reasoning, the rest goes on (harmony, gpt-oss's: router/harmony.py splits its channels into
     reasoning, content and calls at once, in place of 1. and 2.);
  2. that rest is read for tool calls (router/tool_calls.py, with a ToolMode) into content and calls;
  3. the answer's last text ends both, and "stop" becomes "tool_calls" where calls were made;
     the thinking's tokens are counted then (usage's reasoning_tokens).
A unary answer is its whole text fed once, so a stream and a unary answer carry the same parts.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from protos.pdserve.v1 import generation_pb2 as pb
from router.harmony import HarmonySplit
from router.reasoning import Thinking
from router.tool_calls import Delta, Reader, merged
from router.tool_parsers import reader
from router.tools import ToolMode


class ChatSplit:
    def __init__(self, tools: ToolMode | None, reasoning: bool, thinking: bool = False,
                 include_reasoning: bool = True, count: Callable[[Sequence[int]], int] | None = None,
                 harmony: bool = False) -> None:
        """`reasoning`: split thinking out; `thinking`: the prompt opened a think block (the answer
        starts inside it); `include_reasoning` false: the thinking is dropped (vLLM's option);
        `count`: a thinking answer's token ids → its reasoning tokens (reasoning.reasoning_tokens);
        `harmony`: the answer is gpt-oss's channels (thinking and tools read by router/harmony.py)."""
        self.harmony = HarmonySplit(tools) if harmony else None
        self.thinking = Thinking(thinking) if reasoning and not harmony else None
        self.tools: Reader | None = reader(tools) if tools and not harmony else None
        self.include_reasoning = include_reasoning
        self.count, self.ids = count, list[int]()
        self.reasoning_tokens: int | None = None  # set once the answer ends, where thinking is split out

    def feed(self, text: str, finish: str, ids: Sequence[int] = ()) -> tuple[str, Delta, str]:
        """→ (reasoning, content and calls, finish_reason); `finish` set: the answer's last text.
        ids: the tokens of `text` (counted for usage)."""
        if (self.thinking or self.harmony) and self.count:
            self.ids += ids
        if self.harmony is not None:
            return self._harmony(self.harmony, text, finish)
        reasoning, content = self.thinking.feed(text) if self.thinking else ("", text)  # 1.
        if finish and self.thinking:
            more = self.thinking.end()
            reasoning, content = reasoning + more[0], content + more[1]
            self.reasoning_tokens = self.count(self.ids) if self.count and self.thinking.thought else 0
        if not self.include_reasoning:
            reasoning = ""
        if self.tools is None:
            return reasoning, Delta(content), finish
        d = self.tools.feed(content) + (self.tools.end() if finish else Delta())  # 2.
        return reasoning, d, self.tools.finish_reason(finish) if finish else finish  # 3.

    def _harmony(self, split: HarmonySplit, text: str, finish: str) -> tuple[str, Delta, str]:
        reasoning, d = split.feed(text)
        if finish:
            more = split.end()
            reasoning, d = reasoning + more[0], d + more[1]
            self.reasoning_tokens = self.count(self.ids) if self.count and split.thought else 0
            finish = split.finish_reason(finish)
        return reasoning if self.include_reasoning else "", d, finish


def with_reasoning_tokens(usage: pb.Usage, split: ChatSplit | None) -> pb.Usage:
    """`usage` with the answer's reasoning tokens, where its split counted them."""
    if split is not None and split.reasoning_tokens is not None:
        usage.reasoning_tokens = split.reasoning_tokens
    return usage


def parsed_delta(reasoning: str, d: Delta) -> pb.ParsedDelta:
    return pb.ParsedDelta(content=d.content, reasoning=reasoning, tool_calls=[
        pb.ToolCallDelta(index=c["index"], id=c.get("id", ""), name=c["function"].get("name", ""),
                         arguments=c["function"]["arguments"]) for c in d.calls])


def parsed_answer(reasoning: str, d: Delta) -> pb.ParsedAnswer:
    return pb.ParsedAnswer(content=d.content, reasoning=reasoning, tool_calls=[
        pb.ToolCall(id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"])
        for c in merged(d.calls)])
