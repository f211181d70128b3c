"""gpt-oss's chat answers in OpenAI's harmony format (`server.reasoning_parser: harmony`, and for tool
calls `server.tool_call_parser: harmony`): messages on channels, split as they stream.

An answer (the prompt ends with `<|start|>assistant`) is one or more messages:

    <|channel|>analysis<|message|>The user asks ...<|end|>                              → reasoning
    <|start|>assistant<|channel|>commentary<|message|>Let me check.<|end|>               → content (a preamble)
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}<|call|>
                                                                                         → a tool call
    <|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>                  → content

(`to=functions.NAME` may also come before the channel: `<|start|>assistant to=functions.NAME<|channel|>...`.)
  1. a message's header, up to `<|message|>`, is held until it is whole: its channel and recipient;
  2. its body streams, up to `<|end|>`, `<|call|>`, `<|return|>` or the next `<|start|>` (a tail that
     may begin one of them is held back): analysis → reasoning; a call to a tool of the request
     (tool choice "auto") → the call, its body streaming as the arguments; anything else → content;
  3. an answer that does not open with a header (a model not writing harmony), or whose header runs
     past HEADER_MAX characters, is content as written from there.
The markers are special tokens: the fronts keep their text for these answers (skip_special_tokens
false unless the request says). `<|return|>` and `<|call|>` end the answer as EOS tokens, so the
text seldom holds them. A structured output holds only the final message's body (`FINAL`: the
grammar waits for it, as a think parser's waits for `</think>`).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from router.detokenizer import marker_tail
from router.tool_calls import Delta, Reader
from router.tools import ToolMode

START, MESSAGE = "<|start|>", "<|message|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>")  # what ends a message's body (or the next START)
FINAL = "<|channel|>final<|message|>"  # after which the answer's final text comes
_CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_OPENERS = ("<|channel|>", START, "to=")  # how a header may begin
HEADER_MAX = 256  # characters a header may hold before <|message|>; past it the answer is not harmony


class HarmonySplit:
    """One choice's split: `feed` → (reasoning, content and calls) of the text so far; `end` → the
    rest. `thought`: an analysis message was seen; `made`: calls given."""

    def __init__(self, tools: ToolMode | None) -> None:
        self.calls = _Calls(tools or ToolMode("none", ()))
        self.tools = tools
        self.held = ""
        self.state = "header"  # header | body | raw (not harmony: all content)
        self.part = "content"  # the open body's: reasoning | content | call | dropped (a call past the first)
        self.thought = False

    @property
    def made(self) -> int:
        return self.calls.made

    def feed(self, text: str) -> tuple[str, Delta]:
        self.held += text
        reasoning, out = "", Delta()
        while True:
            if self.state == "raw":
                out += Delta(content=self.held)
                self.held = ""
                return reasoning, out
            if self.state == "header":
                lead = self.held.lstrip()
                if not any(lead.startswith(o) or o.startswith(lead) for o in _OPENERS):
                    self.state = "raw"  # 3.
                    continue
                i = lead.find(MESSAGE)
                if i < 0 and len(lead) > HEADER_MAX:
                    self.state = "raw"
                    continue
                if i < 0:
                    return reasoning, out  # 1. not whole yet
                self._open(lead[:i])
                self.held, self.state = lead[i + len(MESSAGE):], "body"
                out += self.calls.head()
            ends = [(j, m) for m in (*ENDS, START) if (j := self.held.find(m)) >= 0]
            if not ends:  # 2. stream what cannot begin a marker
                cut = len(self.held) - max(marker_tail(self.held, m) for m in (*ENDS, START))
                r, d = self._body(self.held[:cut])
                self.held = self.held[cut:]
                return reasoning + r, out + d
            j, marker = min(ends)
            r, d = self._body(self.held[:j])
            reasoning, out = reasoning + r, out + d
            self.held = self.held[j + (0 if marker == START else len(marker)):]
            self.state = "header"

    def end(self) -> tuple[str, Delta]:
        """The rest once the answer ends: a body cut short is said as it is; a header cut short, nothing."""
        held, self.held = self.held, ""
        if self.state == "header":
            return "", Delta()
        if self.state == "raw":
            return "", Delta(content=held)
        return self._body(held)

    def finish_reason(self, reason: str) -> str:
        return self.calls.finish_reason(reason)

    def _open(self, header: str) -> None:
        """A message's header: its channel and recipient decide where its body goes."""
        channel = m.group(1) if (m := _CHANNEL.search(header)) else ""
        to = m.group(1) if (m := _RECIPIENT.search(header)) else ""
        if channel == "analysis":
            self.part, self.thought = "reasoning", True
        elif to.startswith("functions.") and self.tools is not None and self.tools.kind == "auto":
            self.part = "call" if self.calls.begin(to.removeprefix("functions.")) else "content"
        else:
            self.part = "content"

    def _body(self, text: str) -> tuple[str, Delta]:
        if not text:
            return "", Delta()
        if self.part == "reasoning":
            return text, Delta()
        if self.part == "call":
            return "", self.calls.arguments(text)
        return "", Delta(content=text)


class _Calls(Reader):
    """The calls an answer makes (ids, indices, parallel_tool_calls as the other readers have them)."""

    def __init__(self, mode: ToolMode) -> None:
        super().__init__(mode)
        self.pending: list[dict[str, Any]] = []  # the head of a call just begun
        self.open = False  # the open call is given (not dropped by parallel_tool_calls false)

    def begin(self, name: str) -> bool:
        """A call to `name`: True where it is a tool of the request (its body is then the arguments)."""
        if name not in self.mode.names:
            return False
        self.pending = self._call(name, "")
        self.open = bool(self.pending)
        return True

    def head(self) -> Delta:
        out, self.pending = Delta(calls=self.pending), []
        return out

    def arguments(self, text: str) -> Delta:
        return Delta(calls=[{"index": self.made - 1, "function": {"arguments": text}}]) if self.open else Delta()


def reasoning_tokens(ids: Sequence[int], tokenizer: Any) -> int:
    """Of a harmony answer's tokens, those of its analysis messages (header, body and end marker)."""
    n, count, text, channel = 0, 0, "", None  # count: the open message's tokens so far
    for t in ids:
        text += str(tokenizer.decode([t], skip_special_tokens=False))
        count += 1
        if channel is None and MESSAGE in text:
            channel = m.group(1) if (m := _CHANNEL.search(text)) else ""
        if channel is not None and text.endswith(ENDS):
            n += count if channel == "analysis" else 0
            count, text, channel = 0, "", None
    return n + (count if channel == "analysis" else 0)
