"""Tool calling, the answer side: a chat answer's text → `content` and `tool_calls`, as it streams.

One reader per choice (`reader(mode)` in router/tool_parsers.py, the request side being
router/tools.py): `feed` takes each message's text and gives what can be said of it now, `end` the
rest once the answer ends. A unary answer is its text fed whole, so a stream and a unary answer
carry the same calls.
  - named: the text is the function's arguments; they stream as they are made, in call 0;
  - required: the text is a JSON list of {"name", "parameters"}; a call goes out whole once its
    object closes;
  - auto: free text read by `server.tool_call_parser` (router/tool_parsers.py).
`parallel_tool_calls: false` keeps the first call.
finish_reason "stop" becomes "tool_calls" when calls were made (not for a named function: OpenAI's).
Text that could not be read as calls (an answer cut by `length` mid-call) is given as content.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from router.tools import ToolMode


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


class JsonObjects:
    """The JSON objects opening at `level` (1: top level; 2: a list's items) of a text that comes
    in pieces: each is given whole, as raw text, once its braces close."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.text, self.pos, self.depth, self.start = "", 0, 0, -1  # start: of the open object, -1: none
        self.ended = 0  # where the last whole object ended
        self.in_string = self.escaped = False

    def feed(self, text: str) -> list[str]:
        return [raw for _, raw in self.spans(text)]

    def spans(self, text: str) -> list[tuple[str, str]]:
        """feed(), each object with the text between it and the one before (a Mistral call's name)."""
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
                    whole.append((self.text[self.ended:self.start], self.text[self.start:self.pos + 1]))
                    self.start, self.ended = -1, self.pos + 1
        self.pos = len(self.text)
        return whole

    def rest(self) -> str:
        """The object left open (an answer cut mid-call), or ""."""
        return self.text[self.start:] if self.start >= 0 else ""

    def tail(self) -> str:
        """Everything after the last whole object (the open one with the text before it)."""
        return self.text[self.ended:]


class Required(Reader):
    """The JSON list of {"name", "parameters"} a grammar held the answer to."""

    def __init__(self, mode: ToolMode) -> None:
        super().__init__(mode)
        self.objects = JsonObjects(level=2)

    def feed(self, text: str) -> Delta:
        return sum((self._parsed(raw) for raw in self.objects.feed(text)), Delta())

    def end(self) -> Delta:
        return Delta(content=self.objects.rest())


def merged(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stream's call deltas as whole calls (a named function's arguments joined)."""
    calls: list[dict[str, Any]] = []
    for c in deltas:
        if c["index"] < len(calls):
            calls[c["index"]]["function"]["arguments"] += c["function"]["arguments"]
        else:
            calls.append({k: v for k, v in c.items() if k != "index"})
    return calls
