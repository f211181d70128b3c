"""A reasoning model's thinking, split out of a chat answer (`server.reasoning_parser: think`).

DeepSeek R1, Qwen 3 and their kin write their thinking as `<think> ... </think>` before the answer.
  1. where the answer starts: inside a think block when the prompt's text ends in an open one (the
     template opened it for the model, as DeepSeek R1's and Qwen 3 Thinking-2507's do), or when the
     answer's first text is `<think>`; otherwise outside (Qwen 3 with `enable_thinking: false`,
     whose template writes an empty block into the prompt), and then it is all content;
  2. inside, text is reasoning until `</think>`; after it, content (which the tool-call reader, if
     any, reads in turn: router/tool_calls.py); a tail that may begin `</think>` waits for the
     next text, so a marker split over two messages is still found;
  3. an answer that ends inside its thinking (`length`) is all reasoning;
  4. usage counts its tokens as `reasoning_tokens` (OpenAI's completion_tokens_details), found on
     the answer's token ids once it ends (reasoning_tokens()), so a marker split over tokens or
     messages counts where its text completes.
The chat answer carries it as `reasoning` (vLLM's name) and `reasoning_content` (DeepSeek's, which
most clients read); `include_reasoning: false` leaves it out. An answer held to a grammar (a
structured output, a named or required tool choice) thinks freely first, as vLLM holds a
structured output only after the reasoning ends (`think_first`: SamplingParams.grammar_after):
  - the prompt opened a block: the grammar holds what follows `</think>`;
  - it did not (Qwen 3 lets the model open it): the answer's first token may be `<think>` (then
    as above) or the grammar's; where `<think>` is not one token, the grammar holds the answer
    from its first token, which has thinking only if the grammar writes the block.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from protos.pdserve.v1 import generation_pb2 as pb
from router import harmony
from router.detokenizer import marker_tail
from router.errors import InvalidArgument
from router.validation import ValidRequest

OPEN, CLOSE = "<think>", "</think>"
_TAIL_TOKENS = 16  # how much of the prompt's end is looked at for an open block


def prompt_opens_thinking(prompt_ids: list[int], tokenizer: Any) -> bool:
    """Whether the prompt's text ends inside a think block (special tokens' text kept)."""
    tail = str(tokenizer.decode(prompt_ids[-_TAIL_TOKENS:], skip_special_tokens=False))
    return tail.rfind(OPEN) > tail.rfind(CLOSE)


def keep_markers(req: pb.GenerateRequest, parser: str | None) -> None:
    """harmony's channel markers are special tokens: a chat request keeps their text, which the split
    reads (router/harmony.py), unless it sets skip_special_tokens itself."""
    if parser == "harmony" and req.messages and not req.HasField("skip_special_tokens"):
        req.skip_special_tokens = False


def think_first(req: ValidRequest, opened: bool, tokenizer: Any, parser: str = "think") -> ValidRequest:
    """`req` with its grammar (if any) holding only the answer after its thinking: after `</think>`
    where the prompt opened a block (`opened`); where it did not, the answer's first token may open
    one if `<think>` is one token, else the grammar holds the answer from its first token. harmony:
    the final message's body (after `<|channel|>final<|message|>`)."""
    if not req.sampling.grammar or req.sampling.grammar_after:
        return req
    if parser == "harmony":
        return replace(req, sampling=replace(req.sampling, grammar_after=harmony.FINAL))
    if opened:
        return replace(req, sampling=replace(req.sampling, grammar_after=CLOSE))
    if len(tokenizer.encode(OPEN, add_special_tokens=False)) == 1:
        return replace(req, sampling=replace(req.sampling, grammar_after=CLOSE, grammar_free_opener=OPEN))
    return req


def think_budget(req: ValidRequest, reasoning: bool, opened: bool, tokenizer: Any, parser: str = "think") -> ValidRequest:
    """`req` with its thinking budget's marker ids (engine/think_budget.py), where it has a budget:
    "</think>" ends the thinking, and "<think>" opens it where the prompt did not (`opened`).
    InvalidArgument naming thinking_token_budget where the answer is not split (`reasoning`: a chat
    request under server.reasoning_parser) or a marker it needs is not one token."""
    if req.sampling.thinking_budget is None:
        return req
    field = "thinking_token_budget"
    if not reasoning:
        raise InvalidArgument(field, "applies to chat requests (messages) on a server with server.reasoning_parser set")
    if parser == "harmony":  # its end is a message's end and a new header: not one token to force
        raise InvalidArgument(field, "is not supported with server.reasoning_parser harmony (gpt-oss's "
                                     "reasoning_effort sets how long it thinks)")

    def one_token(text: str) -> int:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise InvalidArgument(field, f"needs {text!r} to be one token of this model's tokenizer; it is {len(ids)}")
        return int(ids[0])

    end, start = one_token(CLOSE), -1 if opened else one_token(OPEN)
    return replace(req, sampling=replace(req.sampling, think_end_id=end, think_open_id=start))


def reasoning_tokens(ids: Sequence[int], tokenizer: Any, parser: str = "think") -> int:
    """Of a thinking answer's tokens `ids`, those up to the one whose text completes the first
    `</think>` (all of them where it never closes): the fewest leading tokens whose text holds it.
    harmony: those of its analysis messages (harmony.reasoning_tokens)."""
    if parser == "harmony":
        return harmony.reasoning_tokens(ids, tokenizer)
    def closed(k: int) -> bool:
        return CLOSE in str(tokenizer.decode(list(ids[:k]), skip_special_tokens=False))

    if not closed(len(ids)):
        return len(ids)
    lo, hi = 1, len(ids)
    while lo < hi:  # a prefix's text grows with it: the first k that holds the marker
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if closed(mid) else (mid + 1, hi)
    return lo


class Thinking:
    """One choice's split: `feed` → (reasoning, content) of the text so far; `end` → the rest.
    Whitespace that opens the reasoning, or the content after `</think>`, is dropped."""

    def __init__(self, inside: bool) -> None:
        self.state = "inside" if inside else "start"  # start: the answer may still open a block
        self.thought = inside  # the answer was inside a block at some point
        self.held = ""
        self.trim = {"reasoning": True, "content": False}  # drop leading whitespace of this part

    def feed(self, text: str) -> tuple[str, str]:
        self.held += text
        if self.state == "start":
            lead = self.held.lstrip()
            if OPEN.startswith(lead) and lead != OPEN:  # "", "<", "<thi": not decided yet
                return "", ""
            if not lead.startswith(OPEN):
                self.state = "outside"
            else:
                self.state, self.held, self.thought = "inside", lead[len(OPEN):], True
        if self.state == "outside":
            out, self.held = self.held, ""
            return "", self._part("content", out)
        i = self.held.find(CLOSE)
        if i >= 0:
            reasoning, content = self.held[:i], self.held[i + len(CLOSE):]
            self.state, self.held, self.trim["content"] = "outside", "", True
            return self._part("reasoning", reasoning), self._part("content", content)
        cut = len(self.held) - marker_tail(self.held, CLOSE)
        reasoning, self.held = self.held[:cut], self.held[cut:]
        return self._part("reasoning", reasoning), ""

    def end(self) -> tuple[str, str]:
        held, self.held = self.held, ""
        if self.state == "inside":
            return self._part("reasoning", held), ""
        return "", self._part("content", held) if self.state == "outside" else held

    def _part(self, part: str, text: str) -> str:
        if self.trim[part]:
            text = text.lstrip()
            self.trim[part] = not text
        return text
