"""Tool calling under `tool_choice: "auto"`: the parsers of `server.tool_call_parser`, each a
Reader (router/tool_calls.py) of a model family's free text.
  - `hermes` (Hermes 2 Pro / 3, Qwen 2.5 / 3): `<tool_call>{"name", "arguments"}</tool_call>`
    blocks; the text around them streams as content (a tail that may open a block is held back, as
    is whitespace until more text follows it: whitespace beside calls is dropped); a block goes
    out whole once closed, or unclosed at the end; one that does not parse, or names no tool in
    the request, stays content; text before a block loses its trailing whitespace;
  - `llama3_json` (Llama 3.1 and later): an answer that starts with `{` (or `<|python_tag|>`)
    is `{"name", "parameters"}` objects, `; ` between them, each a call once it closes; an answer
    that starts otherwise is content;
  - `mistral`: content, then `[TOOL_CALLS]` and calls to the end, as a JSON list (before
    v11) or `name[ARGS]{...}` each (v11 and later); each a call once its object closes;
  - `pythonic` (Llama 3.2, Llama 4): an answer that is a Python list of calls, `[f(a=1)]`,
    read once it closes; an answer that starts otherwise is content.
"""
from __future__ import annotations

import ast
import json
from typing import Any

from router.detokenizer import marker_tail
from router.tool_calls import Delta, Named, Reader, Required, JsonObjects
from router.tools import ToolMode

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class Llama3Json(Reader):
    """Llama 3.1+ JSON calls: the answer is `{"name", "parameters"}` objects (`; ` between them),
    maybe after `<|python_tag|>`; an answer that starts otherwise is content."""

    TAG = "<|python_tag|>"

    def __init__(self, mode: ToolMode) -> None:
        super().__init__(mode)
        self.objects = JsonObjects(level=1)
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


class Mistral(Reader):
    """Mistral's calls: content, then `[TOOL_CALLS]` and the calls to the end of the answer, as
    `[{"name", "arguments"}, ...]` (tokenizers before v11: Mistral 7B v0.3) or as `name[ARGS]{...}`
    (v11 and later, `[ARGS]` optional, `[CALL_ID]id` dropped), `[TOOL_CALLS]` before each."""

    TAG = "[TOOL_CALLS]"

    def __init__(self, mode: ToolMode) -> None:
        super().__init__(mode)
        self.held = ""  # content that may open the tag, or the calls' first text until its format shows
        self.objects: JsonObjects | None = None  # level 2: the list; level 1: v11's name{args} calls

    def feed(self, text: str) -> Delta:
        if self.objects is not None:
            return self._calls(text)
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
        listed = lead.startswith("[")
        self.objects = JsonObjects(level=2 if listed else 1)  # v11's tags balance their brackets: level 1 holds
        return Delta(content=content) + self._calls(lead if listed else self.TAG + lead)

    def _calls(self, text: str) -> Delta:
        assert self.objects is not None
        if self.objects.level == 2:
            return sum((self._parsed(raw) for raw in self.objects.feed(text)), Delta())
        out = Delta()
        for before, raw in self.objects.spans(text):  # a call not read stays text as written
            name = before.replace(self.TAG, "").split("[CALL_ID]")[0].replace("[ARGS]", "").strip()
            called = name in self.mode.names and _is_object(raw)
            out += Delta(calls=self._call(name, raw)) if called else Delta(content=before + raw)
        return out

    def end(self) -> Delta:
        if self.objects is None:
            return Delta(content=self.held)
        if self.objects.level == 2:
            return Delta(content=self.objects.rest())
        rest = self.objects.tail()
        return Delta(content=rest) if rest.replace(self.TAG, "").strip() else Delta()


def _is_object(raw: str) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


class Pythonic(Reader):
    """Llama 3.2's and Llama 4's calls: an answer that is a Python list of calls with keyword
    arguments, `[get_weather(city="Paris"), ping()]` (Llama 4: between `<|python_start|>` and
    `<|python_end|>`); its calls go out once the list closes. An answer that starts otherwise, is
    not such a list, or calls a function the request has no tool of, is content."""

    TAGS = ("<|python_start|>", "<|python_end|>")

    def __init__(self, mode: ToolMode) -> None:
        super().__init__(mode)
        self.state, self.held = "start", ""  # start → calls → done | content

    def feed(self, text: str) -> Delta:
        if self.state == "content":
            return Delta(content=text)
        self.held += text
        if self.state == "start":
            lead = self.held.lstrip()
            if not lead or (self.TAGS[0].startswith(lead) and lead != self.TAGS[0]):
                return Delta()
            self.state = "calls" if lead.removeprefix(self.TAGS[0]).lstrip()[:1] in ("[", "") else "content"
            if self.state == "content":
                out, self.held = self.held, ""
                return Delta(content=out)
        body = self._body()
        if self.state == "calls" and body.endswith("]"):
            calls = _python_calls(body)
            if calls is not None and all(name in self.mode.names for name, _ in calls):
                self.state = "done"
                return sum((Delta(calls=self._call(name, json.dumps(args, ensure_ascii=False)))
                            for name, args in calls), Delta())
        return Delta()

    def _body(self) -> str:
        return self.held.strip().removeprefix(self.TAGS[0]).removesuffix(self.TAGS[1]).strip()

    def end(self) -> Delta:
        if self.state in ("start", "calls"):  # never became a list of calls: all content
            return Delta(content=self.held)
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
_PARSERS = {"hermes": Hermes, "llama3_json": Llama3Json, "mistral": Mistral, "pythonic": Pythonic}


def reader(mode: ToolMode) -> Reader:
    return _PARSERS[mode.parser](mode) if mode.kind == "auto" else _READERS[mode.kind](mode)
