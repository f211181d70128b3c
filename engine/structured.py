"""Structured outputs (vLLM's): an answer held to a JSON schema, a regular expression, one of some
strings or a Lark grammar. llguidance (a Rust parser, wheels with no other dependency) turns each
into a grammar, and at each step into the set of tokens that keep the answer matching it.

1. the router (router/validation.py): a request's StructuredOutput → one grammar text
   (grammar_text) and its check (grammar_error: a bad schema, regex or grammar is INVALID_ARGUMENT
   naming its field); SamplingParams.grammar carries the text to the workers
2. a worker (Guides): compiles each grammar against its tokenizer once (cached) when a request
   brings it (reserve, prefill: off the step loop); each request gets its own Guide, a copy
3. each step, per guided row: Guide.follow(output_ids) takes the tokens drawn since, and sample()
   sets every token the grammar refuses to -inf (mask_logits: one bitmask per row, on the host,
   copied to the device without waiting for it)
4. the request ends (finish_reason "stop") once its grammar takes nothing more (Guide.complete),
   or at EOS, which the grammar allows only where the answer may end
With SamplingParams.grammar_after (a reasoning model's "</think>"), a Guide waits: its row is
sampled free until that text is written, and the grammar holds the rest (steps 3 and 4 after it);
with grammar_free_opener ("<think>", one token) the answer's first token may open the free part or
be the grammar's.
A Guide is a function of the tokens it followed: the prefill worker's (the first token) and the
decode worker's agree, and a preempted or moved request's Guide replays its output.
"""
from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from engine.race import on_device

JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: a model cannot pad the answer with blanks forever
CACHED_GRAMMARS = 64  # compiled grammars a worker keeps (least recently used dropped)


def grammar_text(kind: str, spec: Any) -> str:
    """A StructuredOutput's kind and value → llguidance's grammar text (no tokenizer needed).
    kind: json_schema (JSON text) | json_object | regex | choice (list of strings) | grammar (Lark)."""
    from llguidance import LLMatcher

    if kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(spec, defaults=JSON_OPTIONS)
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec)
    if kind == "choice":  # Lark string literals are JSON strings: json.dumps quotes any text exactly
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))
    if kind == "grammar":
        return LLMatcher.grammar_from_lark(spec)
    raise ValueError(f"unknown structured output kind {kind!r}")


def grammar_error(grammar: str, tokenizer: Any = None) -> str:
    """Why the grammar cannot be used ("" if it can): its schema, regex or rules are invalid, or
    (given llguidance_tokenizer()'s) it names a token the tokenizer lacks."""
    from llguidance import LLMatcher

    return LLMatcher.validate_grammar(grammar, tokenizer)


def llguidance_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """An HF fast tokenizer → llguidance's view of it, masks `vocab_size` bits wide (~0.4 s at 49k tokens)."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)


class Guide:
    """One request's place in its grammar. With `after` (a reasoning model's "</think>"), the answer
    is free until that text first appears in it; the grammar holds the tokens after the one that
    completed it (found in the decoded text, so it may span tokens or be one special token). With
    `opener` too (the token id of "<think>"), the free part is optional: the answer's first token
    may be `opener` (then free until `after`) or the grammar's (then held from its first token)."""

    def __init__(self, matcher: Any, executor: Any, after: str = "",
                 decode: Callable[[list[int]], str] | None = None, opener: int | None = None) -> None:
        self.matcher, self.executor = matcher, executor
        self.followed = 0  # output tokens taken so far (scanned for `after`, then consumed)
        self.after, self._decode = after, decode
        self.opener = opener if after else None
        # the output index the grammar holds from; None: not yet (free until `after`)
        self.start: int | None = 0 if not after or self.opener is not None else None
        assert not after or decode is not None, "a Guide that waits for a text needs the tokenizer's decode"

    @property
    def active(self) -> bool:
        """Whether the grammar holds the next token (False while `after` has not been written)."""
        return self.start is not None

    @property
    def opening(self) -> bool:
        """Whether the next token may also be `opener` (the answer's first, when it has one)."""
        return self.opener is not None and self.followed == 0

    def follow(self, output_ids: Sequence[int]) -> None:
        """Take the output tokens not yet taken (a token the grammar refuses leaves it in error: complete)."""
        if len(output_ids) <= self.followed:
            return
        if self.opening and output_ids[0] == self.opener:
            self.start, self.followed = None, 1  # the answer opened its free part
        if self.start is None:
            self.start = self._after_ends(output_ids)
            if self.start is None:
                self.followed = len(output_ids)
                return
            self.followed = self.start
        if len(output_ids) > self.followed:
            self.matcher.consume_tokens(list(output_ids[self.followed:]))
        self.followed = len(output_ids)

    def _after_ends(self, output_ids: Sequence[int]) -> int | None:
        """The index after the token that completes `after`'s first appearance, if the new tokens do."""
        assert self._decode is not None
        reach = len(self.after) + 2  # tokens back a match may start: each of its tokens holds >= 1 of its characters
        lo = max(0, self.followed - reach)
        if self.after not in self._decode(list(output_ids[lo:])):  # one decode for the common case
            return None
        for j in range(self.followed, len(output_ids)):  # the first window that holds it ends at its last token
            if self.after in self._decode(list(output_ids[max(0, j + 1 - reach):j + 1])):
                return j + 1
        return None  # not reached: a text found at once is found token by token

    def fork(self) -> Guide:
        """A copy that may follow other tokens (speculative decoding's drafts), this one unchanged."""
        g = copy.copy(self)
        g.matcher = self.matcher.deep_copy()
        return g

    @property
    def complete(self) -> bool:
        """Nothing more may follow (the grammar is done, or in error)."""
        return self.active and self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class Guides:
    """A worker's grammars, compiled against its tokenizer, and the thread pool that computes a
    step's masks; both made at the first grammar (load_tokenizer: loads the HF tokenizer then)."""

    def __init__(self, load_tokenizer: Callable[[], Any], vocab_size: int) -> None:
        self._load, self.vocab_size = load_tokenizer, vocab_size  # vocab_size: the logits' width (a mask's bits)
        self._lock = threading.Lock()
        self._tokenizer: Any = None  # llguidance's view of the HF tokenizer (_hf)
        self._hf: Any = None
        self._executor: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()  # grammar text → a fresh matcher, or its error

    def prepare(self, grammar: str, opener: str = "") -> str:
        """Compile `grammar` ahead of its first step (from a router call, off the loop); its error
        (or `opener`'s: not one token) or ""."""
        m = self._matcher(grammar)
        if isinstance(m, str):
            return m
        return "" if not opener or self._opener_id(opener) is not None else f"{opener!r} is not one token of this tokenizer"

    def new(self, grammar: str, after: str = "", opener: str = "") -> Guide:
        """A Guide at the grammar's start (`after`, `opener`: SamplingParams.grammar_after,
        grammar_free_opener); ValueError if prepare() found an error."""
        error = self.prepare(grammar, opener)
        if error:
            raise ValueError(f"structured output: {error}")
        m = self._matcher(grammar)
        assert not isinstance(m, str)
        opener_id = self._opener_id(opener) if opener else None
        return Guide(m.deep_copy(), self._executor, after, self._decode_text if after else None, opener_id)

    def _opener_id(self, text: str) -> int | None:
        ids = self._hf.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    def _decode_text(self, ids: list[int]) -> str:
        return str(self._hf.decode(ids, skip_special_tokens=False))

    def _matcher(self, grammar: str) -> Any:
        with self._lock:
            m = self._compiled.get(grammar)
            if m is not None:
                self._compiled.move_to_end(grammar)
                return m
            if self._tokenizer is None:
                from llguidance import LLExecutor

                self._hf = self._load()
                self._tokenizer = llguidance_tokenizer(self._hf, self.vocab_size)
                self._executor = LLExecutor()
        from llguidance import LLMatcher

        fresh = LLMatcher(self._tokenizer, grammar, log_level=0)  # compiles; drops the GIL meanwhile
        m = fresh.get_error() if fresh.is_error() else fresh
        with self._lock:
            self._compiled[grammar] = m
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return m


_BITS: dict[torch.device, torch.Tensor] = {}


def guided(guides: Sequence[Guide | None] | None) -> bool:
    """Whether any row's grammar holds its next token."""
    return guides is not None and any(g is not None and g.active for g in guides)


def mask_logits(logits: torch.Tensor, guides: Sequence[Guide | None]) -> torch.Tensor:
    """logits [B, V] with every token a row's Guide refuses at -inf (rows without one, or whose Guide
    is not yet active, unchanged).
    The masks are computed on the host, in parallel over rows, one bit per token."""
    rows = [i for i, g in enumerate(guides) if g is not None and g.active]
    B, V = logits.shape
    words = (V + 31) // 32
    dev = logits.device
    # [R, W]: bit t % 32 of word t // 32 = token t allowed; pinned on CUDA: its copy does not wait for the device
    bits = torch.zeros((len(rows), words), dtype=torch.int32, pin_memory=dev.type == "cuda")
    first = guides[rows[0]]
    assert first is not None
    first.executor.unsafe_compute_mask_ptr([(guides[i].matcher, r) for r, i in enumerate(rows)],  # type: ignore[union-attr]
                                           bits.data_ptr(), words * 4, len(rows))
    for r, i in enumerate(rows):
        g = guides[i]
        if g is not None and g.opening and g.opener is not None:  # its first token may open a free part instead
            bits.view(torch.uint8)[r, g.opener // 8] |= 1 << (g.opener % 8)
    table = _BITS.get(dev)
    if table is None:  # [256, 8]: a byte's bits, lowest first (little-endian words: token t is bit t % 8 of byte t // 8)
        table = _BITS[dev] = ((torch.arange(256, device=dev)[:, None] >> torch.arange(8, device=dev)) & 1).bool()
    as_bytes = bits.view(torch.uint8).reshape(-1).to(dev, non_blocking=True).int()  # [R * W * 4]
    allowed = table.index_select(0, as_bytes).reshape(len(rows), words * 32)[:, :V]  # [R, V]
    if len(rows) == B:  # every row guided: no rows to pick out and put back
        return logits.masked_fill(~allowed, float("-inf"))
    idx = on_device(rows, dev)
    return logits.index_copy(0, idx, logits.index_select(0, idx).masked_fill(~allowed, float("-inf")))
