"""Incremental detokenization and stop-string matching on text.

Text is released only when it cannot change: a token that ends mid-character (U+FFFD) waits for the
next one, and the last `max(len(stop)) - 1` characters wait until no stop string can start there.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer) -> None:  # type: ignore[no-untyped-def]
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # tokens already turned into text

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        tok = self.tokenizer
        before = tok.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = tok.decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """At the end: whatever text the held-back tokens make, complete or not."""
        tok = self.tokenizer
        before = tok.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = tok.decode(self.ids[self._prefix :], skip_special_tokens=True)
        self._prefix = self._read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


class StopMatcher:
    """Accumulates text; returns what is safe to release and whether a stop string matched."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.released = 0
        self.matched: str | None = None

    def add(self, delta: str) -> str:
        if self.matched is not None:
            return ""
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        if self.stops:
            hit = None
            for s in self.stops:
                i = self.text.find(s, start)
                if i != -1 and (hit is None or i < hit[0]):
                    hit = (i, s)
            if hit is not None:
                self.text = self.text[: hit[0]]
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
