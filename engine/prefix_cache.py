"""A prefill worker's scratch blocks, with the prompt KV of finished requests kept for reuse.

A prompt's KV over its first n full blocks depends only on those n × block_size tokens, so a prompt
that starts like an earlier one (a system prompt, a few-shot preamble, a conversation so far) needs
only its remaining tokens computed. Blocks are found by a digest of every token from the start of
the prompt to the end of the block (sha256, chained block by block): equal digests mean equal
prefixes, never merely similar ones.

A block is, at any time, exactly one of:
    free       holds nothing
    held       in a running request's table (ref count > 0); cached ones may be in several tables
    cached     held by no request, kept with its digest until its room is needed (LRU; a prompt's
               later blocks are evicted before its earlier ones)
  1. allocate(owner, tokens): the longest cached prefix of whole blocks (never the block holding
     the last token: at least one token is computed, to sample from) is held again; fresh blocks
     for the rest come from the free ones, then from evicting cached ones. Returns how many prompt
     tokens are already there — or None, to wait: no room, or another prompt is computing this
     one's next block right now (found cached a step later instead of computed twice)
  2. the owner computes its other tokens into its fresh blocks only (a held block is never written);
     commit(owner, computed) after each step makes its whole computed blocks findable at once
  3. release(owner, computed): as commit, then the blocks are let go: findable ones cached (unless
     the same prefix already is), the rest freed
Pure bookkeeping over ints; no tensors.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence


def block_digests(tokens: Sequence[int], block_size: int, salt: str = "") -> list[bytes]:
    """The chained digest of every full block of `tokens`: digest i covers tokens [0, (i+1) × block_size)
    (and the salt: prompts with different salts share nothing)."""
    out, prev = [], hashlib.sha256(salt.encode()).digest() if salt else b""
    for i in range(len(tokens) // block_size):
        prev = hashlib.sha256(prev + array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()).digest()
        out.append(prev)
    return out


class PrefixCache:
    def __init__(self, num_blocks: int, block_size: int, enabled: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size, self.enabled = num_blocks, block_size, enabled
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs: dict[int, int] = {}  # held blocks → how many tables hold them
        self._cached: OrderedDict[int, None] = OrderedDict()  # cached blocks, least recently used first
        self._block_of: dict[bytes, int] = {}  # digest → the block holding that prefix's last block
        self._digest_of: dict[int, bytes] = {}
        self._owned: dict[str, tuple[list[int], list[bytes]]] = {}  # owner → (table, its full blocks' digests)
        self._computing: dict[bytes, str] = {}  # digest of a block being computed → its owner
        self.hit_tokens = 0  # prompt tokens found cached
        self.query_tokens = 0  # prompt tokens looked up

    # -- queries ------------------------------------------------------------------------------
    @property
    def num_used(self) -> int:
        """Blocks held by requests (cached blocks are room: they go when it is needed)."""
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, owner: str) -> list[int]:
        return self._owned[owner][0]

    # -- changes ------------------------------------------------------------------------------
    def allocate(self, owner: str, tokens: Sequence[int], salt: str = "") -> int | None:
        """1. Hold blocks for all of `tokens`; → tokens whose KV is already there, or None to wait
        (no room, or another prompt is computing the next block). Only blocks cached under the
        same `salt` are reused."""
        if owner in self._owned:
            raise KeyError(f"{owner} already holds blocks")
        digests = block_digests(tokens, self.block_size, salt) if self.enabled else []
        hit: list[int] = []
        reusable = digests[: (len(tokens) - 1) // self.block_size]
        for d in reusable:
            b = self._block_of.get(d)
            if b is None:
                break
            hit.append(b)
        if len(hit) < len(reusable) and reusable[len(hit)] in self._computing:
            return None  # its owner is computing it: wait for it rather than compute it again
        need = self.blocks_for(len(tokens)) - len(hit)
        if need > len(self._free) + len(self._cached) - sum(1 for b in hit if b in self._cached):
            return None
        for b in hit:
            self._cached.pop(b, None)
            self._refs[b] = self._refs.get(b, 0) + 1
        fresh = [self._take() for _ in range(need)]
        self._owned[owner] = (hit + fresh, digests)
        for d in digests[len(hit):]:
            self._computing.setdefault(d, owner)
        self.hit_tokens += len(hit) * self.block_size
        self.query_tokens += len(tokens)
        return len(hit) * self.block_size

    def commit(self, owner: str, computed: int) -> None:
        """2. The owner's first `computed` prompt tokens have their KV: its whole blocks among them
        are findable from now on (a block is registered once; the same prefix twice: the first).
        Unknown owner: no-op."""
        if owner not in self._owned:
            return
        table, digests = self._owned[owner]
        for i in range(min(computed // self.block_size, len(digests))):
            b, d = table[i], digests[i]
            if self._computing.get(d) == owner:
                del self._computing[d]
            if b not in self._digest_of and d not in self._block_of:
                self._block_of[d] = b
                self._digest_of[b] = d

    def release(self, owner: str, computed: int = 0) -> int:
        """3. commit(owner, computed), then the owner lets go of its blocks: findable ones are
        cached, the rest freed. Unknown owner: no-op. → blocks it held."""
        if owner not in self._owned:
            return 0
        self.commit(owner, computed)
        table, digests = self._owned.pop(owner)
        for d in digests:
            if self._computing.get(d) == owner:
                del self._computing[d]
        for i in reversed(range(len(table))):  # later blocks first: they are evicted first
            b = table[i]
            self._refs[b] -= 1
            if self._refs[b] == 0:
                del self._refs[b]
                if b in self._digest_of:
                    self._cached[b] = None
                else:
                    self._free.append(b)
        return len(table)

    def _take(self) -> int:
        if self._free:
            b = self._free.pop()
        else:
            b, _ = self._cached.popitem(last=False)  # least recently used
            del self._block_of[self._digest_of.pop(b)]
        self._refs[b] = 1
        return b

    def check(self) -> None:
        """Integrity: every block is exactly one of free, held, cached; digests map both ways."""
        every = self._free + list(self._refs) + list(self._cached)
        if len(every) != self.num_blocks or set(every) != set(range(self.num_blocks)):
            raise AssertionError(f"prefix cache corrupt: {len(self._free)} free + {len(self._refs)} held + "
                                 f"{len(self._cached)} cached != {self.num_blocks}")
        held = Counter(b for table, _ in self._owned.values() for b in table)
        if held != Counter(self._refs):
            raise AssertionError("prefix cache corrupt: reference counts disagree with the tables")
        if any(self._block_of.get(d) != b for b, d in self._digest_of.items()) or len(self._block_of) != len(self._digest_of):
            raise AssertionError("prefix cache corrupt: digest maps disagree")
        if any(b not in self._digest_of for b in self._cached):
            raise AssertionError("prefix cache corrupt: a cached block without its digest")
        if any(owner not in self._owned for owner in self._computing.values()):
            raise AssertionError("prefix cache corrupt: a block being computed by an owner that left")
