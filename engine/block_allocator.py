"""Pure-Python KV block allocator: ints only, no tensors, testable alone.

A request (an owner) holds a table of block ids; slot `s` of the KV tensor is block `s // block_size`,
offset `s % block_size`. A block is, at any time, exactly one of:
    free       holds nothing
    held       in one or more owners' tables (ref-counted; a block several hold is never written)
    cached     in no table, but registered under the digest of the prefix it ends
               (engine/prefix_cache.py): kept for reuse until its room is needed
Room (`num_free`) is the free blocks and the cached ones. Allocation is all-or-nothing: `allocate`
and `grow` return None when the blocks are not there; a fresh block is a free one, else the least
recently cached one, evicted (an owner's blocks are cached last block first, so a prefix is
evicted from its end).
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Allocation:
    owner: str
    blocks: tuple[int, ...]


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs: dict[int, int] = {}  # held blocks → how many tables hold them
        self._cached: OrderedDict[int, None] = OrderedDict()  # least recently cached first
        self._block_of: dict[bytes, int] = {}  # digest → the registered block ending that prefix
        self._digest_of: dict[int, bytes] = {}
        self._owned: dict[str, list[int]] = {}

    # -- queries ------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Room: free blocks, and cached ones (evicted when needed)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        """Blocks held by owners."""
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, owner: str) -> list[int]:
        return self._owned[owner]

    def writable(self, block: int) -> bool:
        """May its owner write into `block`? Only if it alone holds it and it is not registered (a
        shared or findable block's KV is final)."""
        return self._refs.get(block) == 1 and block not in self._digest_of

    def find(self, digests: Sequence[bytes]) -> list[int]:
        """The registered blocks of the longest run of `digests` from the first (held or cached)."""
        hit: list[int] = []
        for d in digests:
            b = self._block_of.get(d)
            if b is None:
                break
            hit.append(b)
        return hit

    # -- changes ------------------------------------------------------------------------------
    def allocate(self, owner: str, num_tokens: int, head: Sequence[int] = ()) -> Allocation | None:
        """Blocks for `num_tokens` tokens under `owner`: `head` (registered blocks from find(),
        held once more) first, fresh ones for the rest; None if they do not fit."""
        if owner in self._owned:
            raise KeyError(f"{owner} already holds blocks")
        n = self.blocks_for(num_tokens) - len(head)
        if n > self.num_free - sum(1 for b in head if b in self._cached):
            return None
        for b in head:
            self._hold(b)
        blocks = [*head, *(self._take() for _ in range(max(n, 0)))]
        self._owned[owner] = blocks
        return Allocation(owner, tuple(blocks))

    def grow(self, owner: str, num_tokens: int) -> list[int] | None:
        """Add blocks so the owner's hold `num_tokens` tokens: the new block ids (maybe none), or
        None (and no change) if they do not fit."""
        blocks = self._owned[owner]
        n = self.blocks_for(num_tokens) - len(blocks)
        if n > self.num_free:
            return None
        new = [self._take() for _ in range(max(n, 0))]
        blocks.extend(new)
        return new

    def share_head(self, owner: str, head: Sequence[int]) -> None:
        """The owner's first len(head) blocks become `head` (registered blocks from find(), held once
        more); the fresh blocks they replace are freed. Never needs room."""
        table = self._owned[owner]
        if len(head) > len(table):
            raise IndexError(f"{owner}: {len(head)} shared blocks for a table of {len(table)}")
        for i, b in enumerate(head):
            if table[i] != b:
                self._hold(b)
                self._drop(table[i])
                table[i] = b

    def register(self, block: int, digest: bytes) -> None:
        """A held block's KV is complete and ends the prefix `digest`: findable from now on, cached
        when let go. A block or a prefix is registered once (the same prefix twice: the first)."""
        if block not in self._refs:
            raise KeyError(f"block {block} is not held: only a held block's KV can be registered")
        if block not in self._digest_of and digest not in self._block_of:
            self._block_of[digest] = block
            self._digest_of[block] = digest

    def free(self, owner: str) -> int:
        """Let go of the owner's blocks (registered ones are cached, later blocks behind earlier ones,
        the rest freed); an unknown owner is a no-op (returns 0). → blocks it held."""
        blocks = self._owned.pop(owner, None)
        if not blocks:
            return 0
        for b in reversed(blocks):
            self._drop(b)
        return len(blocks)

    def slots(self, owner: str, start: int, end: int) -> list[int]:
        """Flat slot ids of token positions [start, end) of the owner's sequence."""
        table, bs = self._owned[owner], self.block_size
        if end > len(table) * bs:
            raise IndexError(f"{owner}: position {end - 1} beyond its {len(table)} blocks")
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _hold(self, b: int) -> None:
        self._cached.pop(b, None)
        self._refs[b] = self._refs.get(b, 0) + 1

    def _drop(self, b: int) -> None:
        self._refs[b] -= 1
        if self._refs[b] == 0:
            del self._refs[b]
            if b in self._digest_of:
                self._cached[b] = None
            else:
                self._free.append(b)

    def _take(self) -> int:
        if self._free:
            b = self._free.pop()
        else:
            b, _ = self._cached.popitem(last=False)  # least recently cached
            del self._block_of[self._digest_of.pop(b)]
        self._refs[b] = 1
        return b

    def check(self) -> None:
        """Integrity: every block is exactly one of free, held, cached; reference counts match the
        tables; digests map both ways; a cached block has its digest."""
        every = self._free + list(self._refs) + list(self._cached)
        if len(every) != self.num_blocks or set(every) != set(range(self.num_blocks)):
            raise AssertionError(
                f"block allocator corrupt: {len(self._free)} free + {len(self._refs)} held + "
                f"{len(self._cached)} cached != {self.num_blocks}"
            )
        if Counter(b for blocks in self._owned.values() for b in blocks) != Counter(self._refs):
            raise AssertionError("block allocator corrupt: reference counts disagree with the tables")
        if len(self._block_of) != len(self._digest_of) or any(self._block_of.get(d) != b for b, d in self._digest_of.items()):
            raise AssertionError("block allocator corrupt: digest maps disagree")
        if any(b not in self._digest_of for b in self._cached):
            raise AssertionError("block allocator corrupt: a cached block without its digest")
