"""Tool calls in a section of special tokens (`server.tool_call_parser`: `deepseek_v3`, `kimi_k2`):
content, then the section, each call in it `CALL_BEGIN header {arguments} CALL_END`, the header
naming the function:

    deepseek_v3 (V3, R1):  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
                           ```json
                           {"city": "Paris"}
                           ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>
                (V3.1):    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜>...
    kimi_k2:               <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>
                           {"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>

  1. content streams until the section opens (a tail that may open it is held back);
  2. in the section, a call's header is held until its arguments' `{`; a tool of the request →
     the call goes out and its arguments stream (CallStream, router/tool_calls.py); another
     name → the call as written, as content, once it ends;
  3. text after the section is content again.
Kimi K2's calls keep the model's own id (`functions.NAME:0`): its template writes it back next turn.
"""
from __future__ import annotations

from router.detokenizer import marker_tail
from router.tool_calls import CallStream, Delta, Reader
from router.tools import ToolMode


class Sectioned(Reader):
    SECTION: tuple[str, str]
    CALL: tuple[str, str]

    def __init__(self, mode: ToolMode) -> None:
        super().__init__(mode)
        self.held = ""  # text not read yet
        self.inside = False  # in the section
        self.call: CallStream | None = None  # the open call's, once its arguments opened
        self.open = False  # a call began
        self.brace = 0  # where the open call's arguments start in its text

    def name_and_id(self, header: str) -> tuple[str, str]:
        """A call's header → the function's name and the model's id for the call ("": none)."""
        raise NotImplementedError

    def feed(self, text: str) -> Delta:
        self.held += text
        out = Delta()
        while True:
            if not self.inside:
                i = self.held.find(self.SECTION[0])
                if i < 0:
                    cut = len(self.held) - marker_tail(self.held, self.SECTION[0])
                    said, self.held = self.held[:cut], self.held[cut:]
                    return out + Delta(content=said)
                out += Delta(content=self.held[:i])
                self.held, self.inside = self.held[i + len(self.SECTION[0]):], True
            elif self.open:
                j = self.held.find(self.CALL[1])
                inside = self.held[:j] if j >= 0 else self.held[:len(self.held) - marker_tail(self.held, self.CALL[1])]
                out += self._see(inside, ended=j >= 0)
                if j < 0:
                    return out
                self.held, self.open, self.call = self.held[j + len(self.CALL[1]):], False, None
            else:
                rest = self.held.lstrip()
                for marker in (self.CALL[0], self.SECTION[1]):
                    if rest.startswith(marker):
                        self.held, self.open = rest[len(marker):], marker == self.CALL[0]
                        self.inside = marker != self.SECTION[1]
                        break
                else:
                    if any(m.startswith(rest) for m in (self.CALL[0], self.SECTION[1])):
                        return out  # the next text decides
                    nxt = rest.find("<", 1)  # text between calls: skipped up to the next marker
                    self.held = rest[nxt:] if nxt > 0 else ""

    def _see(self, inside: str, ended: bool) -> Delta:
        """The open call's text so far (header, then arguments)."""
        if self.call is None:
            brace = inside.find("{")
            if brace < 0:
                return Delta(content=self.CALL[0] + inside + self.CALL[1]) if ended else Delta()
            header = inside[:brace]
            name, call_id = self.name_and_id(header)
            self.call = CallStream(self, lambda raw: Delta(content=self.CALL[0] + header + raw + self.CALL[1]),
                                   name, args_only=True, call_id=call_id)
            self.brace = brace
        return self.call.see(inside[self.brace:], ended)

    def end(self) -> Delta:
        if self.open and self.call is not None and self.call.called:  # cut mid-arguments: what they have
            return self._see(self.held, ended=True)
        if self.open:
            return Delta(content=self.CALL[0] + self.held)  # cut before a call's arguments: as written
        return Delta() if self.inside else Delta(content=self.held)


class DeepSeekV3(Sectioned):
    SECTION = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")
    CALL = ("<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>")
    SEP = "<｜tool▁sep｜>"

    def name_and_id(self, header: str) -> tuple[str, str]:
        before, _, after = header.partition(self.SEP)
        if before.strip() == "function":  # V3 and R1: the name after the separator, then ```json
            return after.split("```")[0].strip(), ""
        return before.strip(), ""  # V3.1


class KimiK2(Sectioned):
    SECTION = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>")
    CALL = ("<|tool_call_begin|>", "<|tool_call_end|>")

    def name_and_id(self, header: str) -> tuple[str, str]:
        call_id = header.split("<|tool_call_argument_begin|>")[0].strip()  # functions.NAME:0
        return call_id.split(":")[0].split(".")[-1], call_id
