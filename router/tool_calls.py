"""Tool calling, the answer side: a chat answer's text → `content` and `tool_calls`, as it streams.

One reader per choice (`reader(mode)`, the request side being router/tools.py): `feed` takes each
message's text and gives what can be said of it now, `end` the rest once the answer ends. A unary
answer is its text fed whole, so a stream and a unary answer carry the same calls.
  - named: the text is the function's arguments; they stream as they are made, in call 0;
  - required: the text is a JSON list of {"name", "parameters"}; a call goes out whole once its
    object closes;
  - auto, `hermes` (Hermes 2 Pro / 3, Qwen 2.5 / 3): `<tool_call>{"name", "arguments"}</tool_call>`
    blocks; the text around them streams as content (a tail that may open a block is held back, as
    is whitespace until more text follows it: whitespace beside calls is dropped); a block goes
    out whole once closed, or unclosed at the end; one that does not parse, or names no tool in
    the request, stays content; text before a block loses its trailing whitespace;
  - auto, `llama3_json` (Llama 3.1 and later): an answer that starts with `{` (or `<|python_tag|>`)
    is `{"name", "parameters"}` objects, `; ` between them, each a call once it closes; an answer
    that starts otherwise is content.
`parallel_tool_calls: false` keeps the first call.
finish_reason "stop" becomes "tool_calls" when calls were made (not for a named function: OpenAI's).
Text that could not be read as calls (an answer cut by `length` mid-call) is given as content.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from router.detokenizer import marker_tail
from router.tools import ToolMode

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class Delta:
    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's tool_call deltas, each with its index

    def __add__(self, other: Delta) -> Delta:
        return Delta(self.content + other.content, self.calls + other.calls)


class Reader:
    def __init__(self, mode: ToolMode) -> None:
        self.mode = mode
        self.made = 0  # calls given so far

    def feed(self, text: str) -> Delta:
        raise NotImplementedError

    def end(self) -> Delta:
        raise NotImplementedError

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if reason == "stop" and self.made and self.mode.kind != "named" else reason

    def _parsed(self, raw: str) -> Delta:
        """A call's JSON object ({"name", "arguments" or "parameters"}) → the call; one that does
        not parse, or names no tool of the request, stays text."""
        try:
            call = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            call = None
        if not isinstance(call, dict) or call.get("name") not in self.mode.names:
            return Delta(content=raw)
        args = call.get("arguments", call.get("parameters", {}))
        return Delta(calls=self._call(call["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))

    def _call(self, name: str, arguments: str) -> list[dict[str, Any]]:
        """A new call, whole (or its head, for a named function's arguments to follow); none past
        the first with parallel_tool_calls false."""
        if self.made and not self.mode.parallel:
            return []
        self.made += 1
        return [{"index": self.made - 1, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": name, "arguments": arguments}}]


class Named(Reader):
    def feed(self, text: str) -> Delta:
        if not text:
            return Delta()
        if not self.made:
            return Delta(calls=self._call(self.mode.name, text))
        return Delta(calls=[{"index": 0, "function": {"arguments": text}}])

    def end(self) -> Delta:
        return Delta() if self.made else Delta(calls=self._call(self.mode.name, ""))


class _Objects:
    """The JSON objects opening at `level` (1: top level; 2: a list's items) of a text that comes
    in pieces: each is given whole, as raw text, once its braces close."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.text, self.pos, self.depth, self.start = "", 0, 0, -1  # start: of the open object, -1: none
        self.in_string = self.escaped = False

    def feed(self, text: str) -> list[str]:
        self.text += text
        whole = []
        for self.pos in range(self.pos, len(self.text)):
            ch = self.text[self.pos]
            if self.in_string:
                self.escaped, self.in_string = (False, True) if self.escaped else (ch == "\\", ch != '"')
            elif ch == '"':
                self.in_string = True
            elif ch in "[{":
                self.depth += 1
                if self.depth == self.level and ch == "{":
                    self.start = self.pos
            elif ch in "]}":
                self.depth -= 1
                if self.depth == self.level - 1 and self.start >= 0:
                    whole.append(self.text[self.start:self.pos + 1])
                    self.start = -1
        self.pos = len(self.text)
        return whole

    def rest(self) -> str:
        """The object left open (an answer cut mid-call), or ""."""
        return self.text[self.start:] if self.start >= 0 else ""


class Required(Reader):
    """The JSON list of {"name", "parameters"} a grammar held the answer to."""

    def __init__(self, mode: ToolMode) -> None:
        super().__init__(mode)
        self.objects = _Objects(level=2)

    def feed(self, text: str) -> Delta:
        return sum((self._parsed(raw) for raw in self.objects.feed(text)), Delta())

    def end(self) -> Delta:
        return Delta(content=self.objects.rest())


class Llama3Json(Reader):
    """Llama 3.1+ JSON calls: the answer is `{"name", "parameters"}` objects (`; ` between them),
    maybe after `<|python_tag|>`; an answer that starts otherwise is content."""

    TAG = "<|python_tag|>"

    def __init__(self, mode: ToolMode) -> None:
        super().__init__(mode)
        self.objects = _Objects(level=1)
        self.state, self.held = "start", ""  # start → calls | content

    def feed(self, text: str) -> Delta:
        if self.state == "start":
            self.held += text
            lead = self.held.lstrip()
            if not lead or (self.TAG.startswith(lead) and lead != self.TAG):
                return Delta()
            self.state = "calls" if lead.startswith(("{", self.TAG)) else "content"
            text, self.held = self.held, ""
        if self.state == "content":
            return Delta(content=text)
        return sum((self._parsed(raw) for raw in self.objects.feed(text)), Delta())

    def end(self) -> Delta:
        if self.state != "calls":
            return Delta(content=self.held)
        return Delta(content=self.objects.rest())


class Hermes(Reader):
    def __init__(self, mode: ToolMode) -> None:
        super().__init__(mode)
        self.held = ""  # text not given yet: a tail that may open a block, trailing whitespace, or a block's inside
        self.inside = False

    def feed(self, text: str) -> Delta:
        self.held += text
        out = Delta()
        while True:
            if self.inside:
                j = self.held.find(CLOSE)
                if j < 0:
                    return out
                out += self._block(self.held[:j])
                self.held, self.inside = self.held[j + len(CLOSE):], False
                continue
            i = self.held.find(OPEN)
            if i >= 0:
                out += self._content(self.held[:i].rstrip())
                self.held, self.inside = self.held[i + len(OPEN):], True
                continue
            cut = len(self.held) - marker_tail(self.held, OPEN)
            said = self.held[:cut]
            stripped = said.rstrip()
            out += self._content(stripped)
            self.held = said[len(stripped):] + self.held[cut:]
            return out

    def _content(self, text: str) -> Delta:
        """Text outside blocks; whitespace alone is held (`feed` keeps it) until text follows it."""
        return Delta(content=text) if text.strip() else Delta()

    def _block(self, inside: str) -> Delta:
        d = self._parsed(inside)
        return Delta(content=OPEN + inside + CLOSE) if d.content else d  # not a call: the block as written

    def end(self) -> Delta:
        if self.inside:  # a block the answer did not close
            out, self.inside = self._block(self.held), False
            if out.calls:
                return out
            return Delta(content=out.content.removesuffix(CLOSE))
        return Delta(content=self.held) if not self.made or self.held.strip() else Delta()


_READERS = {"named": Named, "required": Required}
_PARSERS = {"hermes": Hermes, "llama3_json": Llama3Json}


def reader(mode: ToolMode) -> Reader:
    return _PARSERS[mode.parser](mode) if mode.kind == "auto" else _READERS[mode.kind](mode)


def merged(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stream's call deltas as whole calls (a named function's arguments joined)."""
    calls: list[dict[str, Any]] = []
    for c in deltas:
        if c["index"] < len(calls):
            calls[c["index"]]["function"]["arguments"] += c["function"]["arguments"]
        else:
            calls.append({k: v for k, v in c.items() if k != "index"})
    return calls
