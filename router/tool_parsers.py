"""Tool calling under `tool_choice: "auto"`: the parsers of `server.tool_call_parser`, each a
Reader (router/tool_calls.py) of a model family's free text.
  - `hermes` (Hermes 2 Pro / 3, Qwen 2.5 / 3): `<tool_call>{"name", "arguments"}</tool_call>`
    blocks; the text around them streams as content (a tail that may open a block is held back, as
    is whitespace until more text follows it: whitespace beside calls is dropped); a block's call
    streams (CallStream, router/tool_calls.py); one that is not a call of a tool in the request
    stays content, as written; text before a block loses its trailing whitespace;
  - `llama3_json` (Llama 3.1 and later): an answer that starts with `{` (or `<|python_tag|>`)
    is `{"name", "parameters"}` objects, `; ` between them, each a streamed call; an answer that
    starts otherwise is content;
  - `mistral`: content, then `[TOOL_CALLS]` and calls to the end, as a JSON list (before
    v11) or `name[ARGS]{...}` each (v11 and later); each a streamed call;
  - `granite` (Granite 3.x): mistral's list after `<|tool_call|>`;
  - `qwen3_coder`, `glm45`: hermes's blocks, each a call in tags (router/tool_xml.py);
  - `deepseek_v3`, `kimi_k2`: calls in a section of special tokens (router/tool_sections.py);
  - `pythonic` (Llama 3.2, Llama 4): an answer that is a Python list of calls, `[f(a=1)]`,
    read once it closes (its arguments are Python, given as JSON); an answer that starts
    otherwise is content.
"""
from __future__ import annotations

import ast
import json
from typing import Any

from router.detokenizer import marker_tail
from router.tool_calls import Brackets, CallObjects, CallStream, Delta, JsonObjects, Named, Reader, Required
from router.tool_sections import DeepSeekV3, KimiK2
from router.tool_xml import GLM45, QWEN3_CODER, XmlCall, parameter_types
from router.tools import ToolMode

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class Llama3Json(Reader):
    """Llama 3.1+ JSON calls: the answer is `{"name", "parameters"}` objects (`; ` between them),
    maybe after `<|python_tag|>`; an answer that starts otherwise is content."""

    TAG = "<|python_tag|>"

    def __init__(self, mode: ToolMode) -> None:
        super().__init__(mode)
        self.objects = CallObjects(self, level=1)
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
        return self.objects.feed(text)

    def end(self) -> Delta:
        if self.state != "calls":
            return Delta(content=self.held)
        return self.objects.end()


class Hermes(Reader):
    def __init__(self, mode: ToolMode) -> None:
        super().__init__(mode)
        self.held = ""  # text not given yet: a tail that may open a block, trailing whitespace, or a block's inside
        self.call: CallStream | XmlCall | None = None  # inside a block: its call

    def feed(self, text: str) -> Delta:
        self.held += text
        out = Delta()
        while True:
            if self.call is not None:
                j = self.held.find(CLOSE)
                if j < 0:  # the inside so far, but a tail that may begin the close
                    return out + self.call.see(self.held[:len(self.held) - marker_tail(self.held, CLOSE)])
                out += self.call.see(self.held[:j], ended=True)
                self.held, self.call = self.held[j + len(CLOSE):], None
                continue
            i = self.held.find(OPEN)
            if i >= 0:
                out += self._content(self.held[:i].rstrip())
                self.held, self.call = self.held[i + len(OPEN):], self._inner()
                continue
            cut = len(self.held) - marker_tail(self.held, OPEN)
            said = self.held[:cut]
            stripped = said.rstrip()
            out += self._content(stripped)
            self.held = said[len(stripped):] + self.held[cut:]
            return out

    def _inner(self) -> CallStream | XmlCall:
        """A new block's call reader."""
        return CallStream(self, self._block)

    def _content(self, text: str) -> Delta:
        """Text outside blocks; whitespace alone is held (`feed` keeps it) until text follows it."""
        return Delta(content=text) if text.strip() else Delta()

    def _block(self, inside: str) -> Delta:
        d = self._parsed(inside)
        return Delta(content=OPEN + inside + CLOSE) if d.content else d  # not a call: the block as written

    def end(self) -> Delta:
        if self.call is not None:  # a block the answer did not close
            out, self.call = self.call.see(self.held, ended=True), None
            return out if out.calls or not out.content else Delta(content=out.content.removesuffix(CLOSE))
        return Delta(content=self.held) if not self.made or self.held.strip() else Delta()


class Qwen3Coder(Hermes):
    """Qwen3-Coder's `<tool_call>` blocks, each a call in tags (router/tool_xml.py)."""

    TAGS = QWEN3_CODER

    def __init__(self, mode: ToolMode) -> None:
        super().__init__(mode)
        self.types = parameter_types(mode.schemas, mode.names)

    def _inner(self) -> XmlCall:
        return XmlCall(self, lambda inside: Delta(content=OPEN + inside + CLOSE), self.types, self.TAGS)


class Glm45(Qwen3Coder):
    """GLM-4.5's and 4.6's `<tool_call>` blocks: the name, then `<arg_key>` / `<arg_value>` pairs."""

    TAGS = GLM45


class Mistral(Reader):
    """Mistral's calls: content, then `[TOOL_CALLS]` and the calls to the end of the answer, as
    `[{"name", "arguments"}, ...]` (tokenizers before v11: Mistral 7B v0.3) or as `name[ARGS]{...}`
    (v11 and later, `[ARGS]` optional, `[CALL_ID]id` dropped), `[TOOL_CALLS]` before each."""

    TAG = "[TOOL_CALLS]"

    def __init__(self, mode: ToolMode) -> None:
        super().__init__(mode)
        self.held = ""  # content that may open the tag, or the calls' first text until its format shows
        self.listed: CallObjects | None = None  # before v11: the list's objects
        self.objects: JsonObjects | None = None  # v11: each call's arguments (level 1: its tags balance their brackets)
        self.call: CallStream | None = None  # v11: the open arguments' call

    def feed(self, text: str) -> Delta:
        if self.listed is not None:
            return self.listed.feed(text)
        if self.objects is not None:
            return self._v11(text)
        self.held += text
        i = self.held.find(self.TAG)
        if i < 0:
            cut = len(self.held) - marker_tail(self.held, self.TAG)
            said, self.held = self.held[:cut], self.held[cut:]
            return Delta(content=said)
        lead = self.held[i + len(self.TAG):].lstrip()
        if not lead:
            return Delta()  # the format shows at the calls' first character
        content, self.held = self.held[:i], ""
        if lead.startswith("["):
            self.listed = CallObjects(self, level=2)
            return Delta(content=content) + self.listed.feed(lead)
        self.objects = JsonObjects(level=1)
        return Delta(content=content) + self._v11(self.TAG + lead)

    def _v11(self, text: str) -> Delta:
        """`name[ARGS]{...}` calls: a tool's streams once its `{` is read; any other stays text as written."""
        assert self.objects is not None
        out = Delta()
        for before, raw in self.objects.spans(text):
            out += self._stream(before).see(raw, ended=True)
            self.call = None
        if self.objects.rest():
            before = self.objects.text[self.objects.ended:self.objects.start]
            out += self._stream(before).see(self.objects.rest())
        return out

    def _stream(self, before: str) -> CallStream:
        if self.call is None:
            name = before.replace(self.TAG, "").split("[CALL_ID]")[0].replace("[ARGS]", "").strip()
            self.call = CallStream(self, lambda raw: Delta(content=before + raw), name, args_only=True)
        return self.call

    def end(self) -> Delta:
        if self.listed is not None:
            return self.listed.end()
        if self.objects is None:
            return Delta(content=self.held)
        if self.call is not None and self.call.called:  # cut mid-arguments: the call keeps what it has
            return Delta()
        rest = self.objects.tail()
        return Delta(content=rest) if rest.replace(self.TAG, "").strip() else Delta()


class Granite(Mistral):
    """Granite 3.x: content, then `<|tool_call|>` and `[{"name", "arguments"}, ...]` to the end."""

    TAG = "<|tool_call|>"


class Pythonic(Reader):
    """Llama 3.2's and Llama 4's calls: an answer that is a Python list of calls with keyword
    arguments, `[get_weather(city="Paris"), ping()]` (Llama 4: between `<|python_start|>` and
    `<|python_end|>`); its calls go out once the list closes (its brackets balance, strings
    skipped), and text after it is content. An answer that starts otherwise, is not such a list,
    or calls a function the request has no tool of, is content."""

    TAGS = ("<|python_start|>", "<|python_end|>")

    def __init__(self, mode: ToolMode) -> None:
        super().__init__(mode)
        self.state, self.held = "start", ""  # start → calls → done | content; held: the answer so far
        self.pos, self.brackets = 0, Brackets(quotes="'\"", opens="([{", closes=")]}")  # pos: how far `held` is read

    def feed(self, text: str) -> Delta:
        if self.state == "content":
            return Delta(content=text)
        self.held += text
        if self.state == "start":
            lead = self.held.lstrip()
            if not lead or (self.TAGS[0].startswith(lead) and lead != self.TAGS[0]):
                return Delta()
            body = lead.removeprefix(self.TAGS[0]).lstrip()
            if body[:1] not in ("[", ""):
                self.state, out, self.held = "content", self.held, ""
                return Delta(content=out)
            self.state, self.pos = "calls", len(self.held) - len(body)
        if self.state != "calls":
            return Delta()  # done: the rest is read at the end
        close = self._close()
        if close < 0:
            return Delta()
        calls = _python_calls(self.held[:close + 1].strip().removeprefix(self.TAGS[0]))
        if calls is None or not all(name in self.mode.names for name, _ in calls):
            self.state, out, self.held = "content", self.held, ""
            return Delta(content=out)
        self.state, self.held = "done", self.held[close + 1:]
        return sum((Delta(calls=self._call(name, json.dumps(args, ensure_ascii=False))) for name, args in calls),
                   Delta())

    def _close(self) -> int:
        """Where in `held` the list's `]` is, once read; else -1."""
        for i in range(self.pos, len(self.held)):
            self.pos = i + 1
            if self.brackets.step(self.held[i]) < 0 and self.brackets.depth == 0:
                return i
        return -1

    def end(self) -> Delta:
        if self.state in ("start", "calls"):  # never became a list of calls: all content
            return Delta(content=self.held)
        if self.state == "done":  # after the list: its closing tag and whitespace are not content
            return Delta(content=self.held.strip().removeprefix(self.TAGS[1]).strip())
        return Delta()


def _python_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """`[f(a=1), g()]` → [(f, {a: 1}), (g, {})]; None if it is not a list of calls with literal
    keyword arguments (true, false and null taken as JSON writes them)."""
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree, ast.List):
        return None
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        args = {}
        for kw in node.keywords:
            if kw.arg is None:
                return None
            try:
                args[kw.arg] = _literal(kw.value)
            except ValueError:
                return None
        calls.append((node.func.id, args))
    return calls


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("** in a dict")
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}  # type: ignore[arg-type]
    return ast.literal_eval(node)  # str, numbers, True / False / None, tuples, negative numbers


_JSON_NAMES = {"true": True, "false": False, "null": None}
_READERS = {"named": Named, "required": Required}
_PARSERS = {"hermes": Hermes, "llama3_json": Llama3Json, "mistral": Mistral, "granite": Granite, "pythonic": Pythonic,
            "qwen3_coder": Qwen3Coder, "glm45": Glm45, "deepseek_v3": DeepSeekV3, "kimi_k2": KimiK2}


def reader(mode: ToolMode) -> Reader:
    return _PARSERS[mode.parser](mode) if mode.kind == "auto" else _READERS[mode.kind](mode)
