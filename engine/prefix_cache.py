"""A KV block allocator that keeps the KV of finished requests for reuse: automatic prefix caching.

A sequence's KV over its first n full blocks depends only on those n × block_size tokens, so a prompt
that starts like an earlier sequence (a system prompt, a few-shot preamble, a conversation so far, a
preempted request's own prompt and output) needs only its remaining tokens computed. Blocks are found
by a digest of every token from the start of the sequence to the end of the block (sha256, chained
block by block, seeded by the request's cache salt): equal digests mean equal prefixes, never merely
similar ones. The blocks' states (free, held, cached) are the BlockAllocator's (block_allocator.py).

  1. allocate_prompt(owner, tokens) — prefill worker, resumed request: hold the longest cached
     prefix of whole blocks (never the block of the last token: at least one token is computed, to
     sample from), fresh blocks for the rest. share_prefix(owner, tokens) — an owner that holds fresh
     blocks already (aggregated worker, at the prompt's admission): its first blocks become the
     cached ones. Both return the tokens already there — or None, to wait: no room, or another
     prompt is computing this one's next block right now (found cached a step later, not computed twice)
  2. the owner computes its other tokens into its fresh blocks only (a shared block is never
     written); commit(owner, computed) after each step makes its whole computed blocks findable
  3. release(owner, computed): commit, then let go — findable blocks cached, the rest freed. An
     owner's sequence may grow past its prompt (a decode worker's output): commit and release then
     take the tokens whose KV is there
Pure bookkeeping over ints; no tensors.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.block_allocator import BlockAllocator


def block_digests(tokens: Sequence[int], block_size: int, salt: str = "", prev: list[bytes] | None = None) -> list[bytes]:
    """The chained digest of every full block of `tokens`: digest i covers tokens [0, (i+1) × block_size)
    (and the salt: sequences with different salts share nothing). `prev`: the digests of its first
    blocks, already known (extended, not recomputed)."""
    out = list(prev or [])
    last = out[-1] if out else hashlib.sha256(salt.encode()).digest() if salt else b""
    for i in range(len(out), len(tokens) // block_size):
        last = hashlib.sha256(last + array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()).digest()
        out.append(last)
    return out


@dataclass
class _Sequence:
    tokens: Sequence[int]  # what it was admitted with (commit may be given a longer sequence)
    salt: str
    digests: list[bytes] = field(default_factory=list)  # of its full blocks, as far as known


class PrefixCache(BlockAllocator):
    def __init__(self, num_blocks: int, block_size: int, enabled: bool = True) -> None:
        super().__init__(num_blocks, block_size)
        self.enabled = enabled
        self._seqs: dict[str, _Sequence] = {}  # owners whose blocks may be registered
        self._computing: dict[bytes, str] = {}  # digest of a block being computed → its owner
        self.hit_tokens = 0  # prompt tokens found cached
        self.query_tokens = 0  # prompt tokens looked up

    # -- 1. admission -------------------------------------------------------------------------
    def allocate_prompt(
        self, owner: str, tokens: Sequence[int], salt: str = "", num_tokens: int = 0, wait: bool = True,
        reuse: bool = True,
    ) -> int | None:
        """Hold blocks for all of `tokens` (or `num_tokens`, if more), its longest cached prefix among
        them; → tokens whose KV is already there, or None to wait (no room, or another owner is
        computing the next block). Only blocks cached under the same `salt` are reused. wait=False
        (a decode worker's reservation): never wait for a block being computed, and make nobody
        wait for this owner's. reuse=False (a prompt whose every position is computed: prompt
        logprobs): nothing is looked up, but its blocks are findable once computed, as any."""
        if owner in self._owned:
            raise KeyError(f"{owner} already holds blocks")
        found = self._lookup(tokens, salt, wait, reuse)
        if found is None:
            return None
        digests, hit = found
        if self.allocate(owner, max(len(tokens), num_tokens), hit) is None:
            return None
        return self._admitted(owner, tokens, salt, digests, len(hit), wait)

    def share_prefix(self, owner: str, tokens: Sequence[int], salt: str = "", reuse: bool = True) -> int | None:
        """The owner holds blocks for `tokens` already: its first ones become the longest cached
        prefix (its fresh ones there are freed); → tokens whose KV is already there, or None to wait.
        reuse=False: as allocate_prompt's."""
        found = self._lookup(tokens, salt, reuse=reuse)
        if found is None:
            return None
        digests, hit = found
        self.share_head(owner, hit)
        return self._admitted(owner, tokens, salt, digests, len(hit))

    def track(self, owner: str, tokens: Sequence[int], salt: str) -> None:
        """An owner that holds fresh blocks (nothing looked up) whose KV may be registered later."""
        if self.enabled:
            self._seqs[owner] = _Sequence(tokens, salt)

    def _lookup(self, tokens: Sequence[int], salt: str, wait: bool = True, reuse: bool = True,
                ) -> tuple[list[bytes], list[int]] | None:
        """(digests of the full blocks of `tokens`, the cached blocks of its reusable prefix), or None
        (if `wait`) when the block after that prefix is being computed by another owner right now."""
        digests = block_digests(tokens, self.block_size, salt) if self.enabled else []
        reusable = digests[: (len(tokens) - 1) // self.block_size] if reuse else []
        hit = self.find(reusable)
        if wait and len(hit) < len(reusable) and reusable[len(hit)] in self._computing:
            return None
        return digests, hit

    def _admitted(self, owner: str, tokens: Sequence[int], salt: str, digests: list[bytes], hits: int,
                  mark: bool = True) -> int:
        if self.enabled:
            self._seqs[owner] = _Sequence(tokens, salt, digests)
            for d in digests[hits:] if mark else ():
                self._computing.setdefault(d, owner)
        self.hit_tokens += hits * self.block_size
        self.query_tokens += len(tokens)
        return hits * self.block_size

    # -- 2. computed ----------------------------------------------------------------------------
    def commit(self, owner: str, computed: int, tokens: Sequence[int] | None = None) -> None:
        """The owner's first `computed` tokens (of `tokens`, default those it was admitted with) have
        their KV: its whole blocks among them are findable from now on. Untracked owner: no-op."""
        seq = self._seqs.get(owner)
        if seq is None:
            return
        tokens = seq.tokens if tokens is None else tokens
        n = min(computed, len(tokens)) // self.block_size
        if n > len(seq.digests):
            seq.digests = block_digests(tokens[: n * self.block_size], self.block_size, seq.salt, seq.digests)
        table = self._owned[owner]
        for i in range(min(n, len(table))):
            d = seq.digests[i]
            if self._computing.get(d) == owner:
                del self._computing[d]
            self.register(table[i], d)

    # -- 3. let go ------------------------------------------------------------------------------
    def release(self, owner: str, computed: int = 0, tokens: Sequence[int] | None = None) -> int:
        """commit(owner, computed, tokens), then free(owner). → blocks it held."""
        self.commit(owner, computed, tokens)
        return self.free(owner)

    def free(self, owner: str) -> int:
        """Let go of the owner's blocks without registering more of them."""
        seq = self._seqs.pop(owner, None)
        if seq is not None:
            for d in seq.digests:
                if self._computing.get(d) == owner:
                    del self._computing[d]
        return super().free(owner)

    def check(self) -> None:
        super().check()
        if any(owner not in self._owned for owner in [*self._seqs, *self._computing.values()]):
            raise AssertionError("prefix cache corrupt: a sequence of an owner that holds no blocks")
