"""Tool calling, the answer side: a chat answer's text → `content` and `tool_calls`, as it streams.

One reader per choice (`reader(mode)` in router/tool_parsers.py, the request side being
router/tools.py): `feed` takes each message's text and gives what can be said of it now, `end` the
rest once the answer ends. A unary answer is its text fed whole, so a stream and a unary answer
carry the same calls.
  - named: the text is the function's arguments; they stream as they are made, in call 0;
  - required: the text is a JSON list of {"name", "parameters"}, each object a CallStream;
  - auto: free text read by `server.tool_call_parser` (router/tool_parsers.py).
A call in JSON (`CallStream`) goes out once its name and the opening of its arguments are read,
then its arguments stream as made (as OpenAI's do); an answer cut mid-arguments leaves that call
with the arguments made so far. `parallel_tool_calls: false` keeps the first call.
finish_reason "stop" becomes "tool_calls" when calls were made (not for a named function: OpenAI's).
Text that could not be read as calls (an answer cut before a call's arguments) is given as content.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from router.tools import ToolMode


@dataclass
class Delta:
    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's tool_call deltas, each with its index

    def __add__(self, other: Delta) -> Delta:
        """Both in order; arguments that continue the call before them join it (one entry per call)."""
        calls = list(self.calls)
        for c in other.calls:
            if calls and calls[-1]["index"] == c["index"] and "id" not in c:
                fn = calls[-1]["function"]
                calls[-1] = {**calls[-1], "function": {**fn, "arguments": fn["arguments"] + c["function"]["arguments"]}}
            else:
                calls.append(c)
        return Delta(self.content + other.content, calls)


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

    def _call(self, name: str, arguments: str, call_id: str = "") -> list[dict[str, Any]]:
        """A new call, whole (or its head, for a named function's arguments to follow); none past
        the first with parallel_tool_calls false. `call_id`: the model's own (Kimi K2's), else made."""
        if self.made and not self.mode.parallel:
            return []
        self.made += 1
        return [{"index": self.made - 1, "id": call_id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
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


class Brackets:
    """How deep in brackets a text is, read a character at a time, strings skipped: JSON's (`"`,
    `[{`) or, given them, Python's (`'"`, `([{`)."""

    def __init__(self, quotes: str = '"', opens: str = "[{", closes: str = "]}") -> None:
        self.quotes, self.opens, self.closes = quotes, opens, closes
        self.depth = 0
        self.quote, self.escaped = "", False  # the open string's quote

    def step(self, ch: str) -> int:
        """Read `ch`: +1 it opens a bracket, -1 it closes one, 0 otherwise (in a string, or not one)."""
        if self.quote:
            self.escaped, closes = (False, False) if self.escaped else (ch == "\\", ch == self.quote)
            self.quote = "" if closes else self.quote
        elif ch in self.quotes:
            self.quote = ch
        elif ch in self.opens:
            self.depth += 1
            return 1
        elif ch in self.closes:
            self.depth -= 1
            return -1
        return 0


class JsonObjects:
    """The JSON objects opening at `level` (1: top level; 2: a list's items) of a text that comes
    in pieces: each is given whole, as raw text, once its braces close."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.text, self.pos, self.start = "", 0, -1  # start: of the open object, -1: none
        self.ended = 0  # where the last whole object ended
        self.brackets = Brackets()

    def feed(self, text: str) -> list[str]:
        return [raw for _, raw in self.spans(text)]

    def spans(self, text: str) -> list[tuple[str, str]]:
        """feed(), each object with the text between it and the one before (a Mistral call's name)."""
        self.text += text
        whole = []
        for self.pos in range(self.pos, len(self.text)):
            ch = self.text[self.pos]
            step = self.brackets.step(ch)
            if step > 0 and self.brackets.depth == self.level and ch == "{":
                self.start = self.pos
            elif step < 0 and self.brackets.depth == self.level - 1 and self.start >= 0:
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


# a call's head: its name (JSON text), then its arguments' key, up to the object they open
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


class CallStream:
    """One call's JSON object as its text comes, `{"name": ..., "arguments" (or "parameters"): {...}}`
    (or, given `name`, the arguments' object alone: Mistral's `name[ARGS]{...}`).
      1. head: the text is held until its name and the `{` of its arguments are read;
      2. a tool of the request: the call goes out (`streaming`; `dropped` when parallel_tool_calls
         false has had its call), then each new piece of its arguments, up to where they close;
      3. never a head (keys in another order, arguments as a string, a name of no tool): read
         whole once the object ends, by `whole` (a call, or the text as written)."""

    def __init__(self, reader: Reader, whole: Callable[[str], Delta], name: str | None = None,
                 args_only: bool = False, call_id: str = "") -> None:
        self.reader, self.whole, self.call_id = reader, whole, call_id
        self.state = "head"  # head → streaming | dropped | whole (args_only with a name of no tool)
        if args_only:
            self.state = "head" if name in reader.mode.names else "whole"
        self.name, self.args_only = name, args_only
        self.text = ""
        self.pos = self.index = 0  # pos: how far the arguments are read; index: the call's
        self.brackets, self.closed = Brackets(), False

    def see(self, text: str, ended: bool = False) -> Delta:
        """`text`: the object so far (it only grows); `ended`: it closed, or the answer ended."""
        self.text = text
        out = Delta()
        if self.state == "head":
            start = 0 if self.args_only else self._head()  # args_only: the text opens at its "{"
            if start is not None:
                calls = self.reader._call(self.name or "", "", self.call_id)
                self.state, self.pos = ("streaming", start) if calls else ("dropped", start)
                self.index = calls[0]["index"] if calls else 0
                out = Delta(calls=calls)
        if self.state == "streaming":
            piece = self._arguments()
            if piece:
                out += Delta(calls=[{"index": self.index, "function": {"arguments": piece}}])
        elif self.state in ("head", "whole") and ended:
            out = self.whole(text)
        return out

    @property
    def called(self) -> bool:
        """The object went out as a call (or was dropped as one): none of its text is content."""
        return self.state in ("streaming", "dropped")

    def _head(self) -> int | None:
        """Where the arguments' object starts, once the head is read and names a tool; else None."""
        m = _HEAD.match(self.text)
        if m is None:
            return None
        try:
            name = json.loads(m.group(1))
        except (json.JSONDecodeError, RecursionError):
            return None
        if name not in self.reader.mode.names:
            return None
        self.name = name
        return m.end()

    def _arguments(self) -> str:
        """The arguments' text read since the last call, up to where their object closes."""
        start = self.pos
        for i in range(self.pos, len(self.text)):
            if self.closed:
                break
            self.pos = i + 1
            self.closed = self.brackets.step(self.text[i]) < 0 and self.brackets.depth == 0
        return self.text[start:self.pos]


class CallObjects:
    """JsonObjects that are calls, each read by a CallStream as its text comes."""

    def __init__(self, reader: Reader, level: int) -> None:
        self.reader, self.objects = reader, JsonObjects(level)
        self.call: CallStream | None = None  # the open object's

    def feed(self, text: str) -> Delta:
        out = Delta()
        for raw in self.objects.feed(text):
            out += self._stream().see(raw, ended=True)
            self.call = None
        if self.objects.rest():
            out += self._stream().see(self.objects.rest())
        return out

    def _stream(self) -> CallStream:
        if self.call is None:
            self.call = CallStream(self.reader, self.reader._parsed)
        return self.call

    def end(self) -> Delta:
        """The object left open (an answer cut mid-call) as content, unless it went out as a call."""
        return Delta() if self.call is not None and self.call.called else Delta(content=self.objects.rest())


class Required(Reader):
    """The JSON list of {"name", "parameters"} a grammar held the answer to."""

    def __init__(self, mode: ToolMode) -> None:
        super().__init__(mode)
        self.objects = CallObjects(self, level=2)

    def feed(self, text: str) -> Delta:
        return self.objects.feed(text)

    def end(self) -> Delta:
        return self.objects.end()


def merged(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stream's call deltas as whole calls (a named function's arguments joined)."""
    calls: list[dict[str, Any]] = []
    for c in deltas:
        if c["index"] < len(calls):
            calls[c["index"]]["function"]["arguments"] += c["function"]["arguments"]
        else:
            calls.append({k: v for k, v in c.items() if k != "index"})
    return calls
