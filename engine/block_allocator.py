"""Pure-Python KV block allocator: ints only, no tensors, testable alone.

A request owns a list of block ids; slot `s` of the KV tensor is block `s // block_size`, offset
`s % block_size`. Allocation is all-or-nothing: `allocate` (and `grow`, which adds blocks to an owner's)
returns None when the blocks are not there.
"""
from __future__ import annotations

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
        self._owned: dict[str, list[int]] = {}

    # -- queries ------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, owner: str) -> list[int]:
        return self._owned[owner]

    # -- changes ------------------------------------------------------------------------------
    def allocate(self, owner: str, num_tokens: int) -> Allocation | None:
        """Reserve blocks for `num_tokens` tokens under `owner`; None if they do not fit."""
        if owner in self._owned:
            raise KeyError(f"{owner} already holds blocks")
        n = self.blocks_for(num_tokens)
        if n > len(self._free):
            return None
        blocks = [self._free.pop() for _ in range(n)]
        self._owned[owner] = blocks
        return Allocation(owner, tuple(blocks))

    def grow(self, owner: str, num_tokens: int) -> list[int] | None:
        """Add blocks so the owner's hold `num_tokens` tokens: the new block ids (maybe none), or
        None (and no change) if they do not fit."""
        blocks = self._owned[owner]
        n = self.blocks_for(num_tokens) - len(blocks)
        if n > len(self._free):
            return None
        new = [self._free.pop() for _ in range(max(n, 0))]
        blocks.extend(new)
        return new

    def free(self, owner: str) -> int:
        """Return the owner's blocks; freeing an unknown owner is a no-op (returns 0)."""
        blocks = self._owned.pop(owner, None)
        if not blocks:
            return 0
        self._free.extend(reversed(blocks))
        return len(blocks)

    def slots(self, owner: str, start: int, end: int) -> list[int]:
        """Flat slot ids of token positions [start, end) of the owner's sequence."""
        table, bs = self._owned[owner], self.block_size
        if end > len(table) * bs:
            raise IndexError(f"{owner}: position {end - 1} beyond its {len(table)} blocks")
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def check(self) -> None:
        """Integrity: every block is free xor owned by exactly one owner (free + used == total)."""
        owned = [b for blocks in self._owned.values() for b in blocks]
        every = owned + self._free
        if len(every) != self.num_blocks or set(every) != set(range(self.num_blocks)):
            raise AssertionError(
                f"block allocator corrupt: {len(self._free)} free + {len(owned)} owned != {self.num_blocks}"
            )
