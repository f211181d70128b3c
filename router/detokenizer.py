"""Incremental detokenization and stop-string matching on text.

Text is released only when it cannot change: a token that ends mid-character (U+FFFD) waits for the
next one, and the last `max(len(stop)) - 1` characters wait until no stop string can start there.

This runs twice per message streamed: a tokenizer backed by the Rust `tokenizers` library is called
directly (what its `decode` returns, without transformers' per-call wrapping, which was ~30 % of the
router's own CPU per token: `bench/router_path.py` 17 → 12.6 µs), unless it cleans up spaces after
decoding, which only transformers does.
"""
from __future__ import annotations

from collections.abc import Callable


def text_decoder(tokenizer, skip_special_tokens: bool = True) -> Callable[[list[int]], str]:  # type: ignore[no-untyped-def]
    """ids → text: the same text as `tokenizer.decode(ids, skip_special_tokens=...)`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and callable(getattr(backend, "decode", None)) \
            and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:  # type: ignore[no-untyped-def]
        self.decode = text_decoder(tokenizer, skip_special_tokens)
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # tokens already turned into text

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        before = self.decode(self.ids[self._prefix : self._read])
        after = self.decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """At the end: whatever text the held-back tokens make, complete or not."""
        before = self.decode(self.ids[self._prefix : self._read])
        after = self.decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


def marker_tail(text: str, marker: str) -> int:
    """How many of `text`'s last characters could be the start of `marker`: text a reader of
    markers (<tool_call>, </think>) holds back until the next piece decides."""
    return next((k for k in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:k])), 0)


class StopMatcher:
    """Accumulates text; returns what is safe to release and whether a stop string matched (the text
    ends before it, or with it: `include`)."""

    def __init__(self, stops: tuple[str, ...], include: bool = False) -> None:
        self.stops, self.include = stops, include
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.released = 0
        self.floor = 0  # no stop string may start before this (the text of the first min_tokens tokens)
        self.matched: str | None = None

    def add(self, delta: str, armed: bool = True) -> str:
        """`armed` False: the text of tokens within the request's min_tokens, where (as in vLLM) no
        stop string may start; it is released at once."""
        if self.matched is not None:
            return ""
        start = max(self.floor, len(self.text) - self.hold)
        self.text += delta
        if not armed:
            self.floor = len(self.text)
            return self._release(len(self.text))
        if self.stops:
            hit = None
            for s in self.stops:
                i = self.text.find(s, start)
                if i != -1 and (hit is None or i < hit[0]):
                    hit = (i, s)
            if hit is not None:
                self.text = self.text[: hit[0] + (len(hit[1]) if self.include else 0)]
                self.matched = hit[1]
                return self._release(len(self.text))
        return self._release(len(self.text) - self.hold)

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.released:
            return ""
        out = self.text[self.released : upto]
        self.released = upto
        return out
