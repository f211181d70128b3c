"""Tool calls in XML-like tags (`server.tool_call_parser`: `qwen3_coder`, `glm45`): `<tool_call>`
blocks, as hermes's (router/tool_parsers.py), each holding a call whose parameters are tagged text
rather than JSON:

    qwen3_coder (Qwen3-Coder):          glm45 (GLM-4.5, 4.6):
    <tool_call>                         <tool_call>write_file
    <function=write_file>               <arg_key>path</arg_key>
    <parameter=path>                    <arg_value>src/a.py</arg_value>
    src/a.py                            <arg_key>lines</arg_key>
    </parameter>                        <arg_value>3</arg_value>
    <parameter=lines>                   </tool_call>
    3
    </parameter>
    </function>
    </tool_call>

A value is text, not JSON: the tool's schema says what it is (`string` and no type: as written;
`integer`, `number`, `boolean`, `object`, `array` and others: read as JSON, or as written where it
does not read; `null` is null but for a string). One newline after a parameter's tag and one before
its close are layout, not value. A parameter left unclosed ends at the next tag.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router.detokenizer import marker_tail
from router.tool_calls import Delta, Reader


@dataclass(frozen=True)
class Tags:
    """A dialect's tags."""

    head: re.Pattern[str]  # the function's name (group 1), at the block's start, once it is whole
    key: re.Pattern[str]  # a parameter's key (group 1), up to where its value starts
    opens: str  # how a parameter's tag begins (text that may still become one waits)
    ends: tuple[tuple[str, bool], ...]  # what ends a value, and whether it is the value's own close (read past)
    end: str  # what ends the function ("": the block's end alone)


PARAMETER = "<parameter="
QWEN3_CODER = Tags(re.compile(r"\s*<function=([^>]*)>"), re.compile(r"<parameter=([^>]*)>"), PARAMETER,
                   (("</parameter>", True), (PARAMETER, False), ("</function>", False)), "</function>")
GLM45 = Tags(re.compile(r"\s*([^\s<]+)(?=[\s<])"), re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>", re.S),
             "<arg_key>", (("</arg_value>", True), ("<arg_key>", False)), "")


def parameter_types(schemas: tuple[str, ...], names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Each tool's parameters' JSON-schema `type` (a name, a list of names, or None), by tool and name."""
    out: dict[str, dict[str, Any]] = {}
    for name, text in zip(names, schemas):
        try:
            props = json.loads(text).get("properties") if text else None
        except (json.JSONDecodeError, RecursionError, AttributeError):
            props = None
        props = props if isinstance(props, dict) else {}
        out[name] = {k: v.get("type") for k, v in props.items() if isinstance(v, dict)}
    return out


class XmlCall:
    """One block's call as its text comes (the interface of CallStream, router/tool_calls.py):
      1. head: held until the function's name is read (`<function=NAME>`; glm45: `NAME` and a
         newline); a tool of the request → the call goes out with arguments `{` (`streaming`;
         `dropped` when parallel_tool_calls false has had its call);
      2. each parameter: `"KEY": ` once its tag is read; a string's value then streams as JSON text
         as it comes, any other value goes out once its close is read;
      3. `</function>` (glm45: none), or the block's end, closes the arguments: `}`.
    A block that never names a tool is read whole by `whole` (the block as written)."""

    def __init__(self, reader: Reader, whole: Callable[[str], Delta], types: dict[str, dict[str, Any]],
                 tags: Tags) -> None:
        self.reader, self.whole, self.types, self.tags = reader, whole, types, tags
        self.state = "head"  # head → streaming | dropped
        self.text = ""
        self.pos = self.index = self.count = 0  # pos: how far the text is read; count: parameters given
        self.key: str | None = None  # the open parameter's
        self.value_at = self.sent = 0  # where its value starts; how much of a string value is given
        self.kinds: dict[str, Any] = {}  # the function's parameter types
        self.closed = False

    @property
    def called(self) -> bool:
        return self.state in ("streaming", "dropped")

    def see(self, text: str, ended: bool = False) -> Delta:
        """`text`: the block's inside so far (it only grows); `ended`: the block, or the answer, ended."""
        self.text = text
        out = Delta()
        if self.state == "head":
            m = self.tags.head.match(text + "\n" if ended else text)  # the end ends a name
            name = m.group(1).strip() if m else ""
            if name not in self.reader.mode.names:
                return self.whole(text) if ended else out
            calls = self.reader._call(name, "{")
            self.state, self.pos = ("streaming" if calls else "dropped"), m.end()  # type: ignore[union-attr]
            self.index, self.kinds = (calls[0]["index"] if calls else 0), self.types.get(name, {})
            out = Delta(calls=calls)
        if self.state == "streaming":
            piece = self._arguments(ended)
            if piece:
                out += Delta(calls=[{"index": self.index, "function": {"arguments": piece}}])
        return out

    def _arguments(self, ended: bool) -> str:
        """The arguments' JSON text that the text read since the last call gives."""
        out = []
        while not self.closed:
            if self.key is not None:
                done, piece = self._value(ended)
                out.append(piece)
                if not done:
                    break
                continue
            rest = self.text[self.pos:].lstrip()
            skipped = len(self.text) - self.pos - len(rest)
            m, end = self.tags.key.match(rest), self.tags.end
            if m is not None:
                self.key, self.pos = m.group(1).strip(), self.pos + skipped + m.end()
                self.value_at, self.sent = self.pos, 0
                out.append((", " if self.count else "") + json.dumps(self.key, ensure_ascii=False) + ": "
                           + ('"' if self._string(self.key) else ""))
                self.count += 1
            elif (end and rest.startswith(end)) or (ended and not rest):
                out.append("}")
                self.closed = True
            elif not ended and (not rest or rest.startswith(self.tags.opens) or self.tags.opens.startswith(rest)
                                or end.startswith(rest)):
                break  # more text decides
            else:  # text between parameters (or a tag the end cut): skipped up to the next tag
                nxt = rest.find("<", 1)
                self.pos += skipped + (nxt if nxt > 0 else len(rest))
        return "".join(out)

    def _value(self, ended: bool) -> tuple[bool, str]:
        """The open parameter's value: (closed, its JSON text given now)."""
        key, value = self.key, self.text[self.value_at:]
        assert key is not None
        found = [(i, len(tag) if own else 0) for tag, own in self.tags.ends if (i := value.find(tag)) >= 0]
        if found or ended:
            end, skip = min(found) if found else (len(value), 0)
            text = value[:end].removeprefix("\n").removesuffix("\n")
            self.pos, self.key = self.value_at + end + skip, None
            if self._string(key):
                return True, _json_chars(text[self.sent:]) + '"'
            return True, json.dumps(_typed(text, self.kinds.get(key)), ensure_ascii=False)
        if not self._string(key):
            return False, ""
        hold = max(marker_tail(value, tag) for tag, _ in self.tags.ends)
        text = value[:len(value) - hold].removeprefix("\n")
        text = text.removesuffix("\n")  # maybe the layout's, before the close
        piece, self.sent = text[self.sent:], max(self.sent, len(text))
        return False, _json_chars(piece)

    def _string(self, key: str) -> bool:
        """Whether the parameter's value is text as written (its schema: string, or no type)."""
        kind = self.kinds.get(key)
        return kind in (None, "string") or (isinstance(kind, list) and "string" in kind)


_WORDS = {"true": True, "false": False, "null": None, "none": None}  # as Python or another case writes them


def _json_chars(text: str) -> str:
    """Characters of a JSON string's inside (no quotes)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _typed(text: str, kind: Any) -> Any:
    """A non-string parameter's text → its value: JSON where it reads as JSON, else the text."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        lowered = text.strip().lower()
        return _WORDS[lowered] if lowered in _WORDS else text
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value
