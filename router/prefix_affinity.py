"""Where the router last sent each prompt prefix, so that a prompt goes where its prefix is cached.

The prefill workers keep handed-off prompts' KV blocks (engine/prefix_cache.py), found by the digest
of every token up to a block's end. The router computes the same digests and remembers, for each,
the prefill worker it last sent that prefix to (at most `capacity` digests, least recently used
forgotten first). It is the router's memory, not the worker's: a worker may have evicted what it
is credited with, or restarted — the prompt is then computed there, never wrong, and the next
record sets it right.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from engine.prefix_cache import block_digests


class PrefixAffinity:
    def __init__(self, block_size: int, capacity: int = 1 << 16) -> None:
        self.block_size, self.capacity = block_size, capacity
        self._where: OrderedDict[bytes, int] = OrderedDict()  # digest → prefill worker index

    def digests(self, prompt: Sequence[int], salt: str = "") -> list[bytes]:
        """The digests a prefill worker can reuse for `prompt` (never the block of its last token)."""
        return block_digests(prompt[: (len(prompt) - 1) // self.block_size * self.block_size], self.block_size, salt)

    def holder(self, digests: list[bytes]) -> tuple[int | None, int]:
        """(the worker last sent this prompt's longest remembered prefix, that prefix's tokens)."""
        worker = self._where.get(digests[0]) if digests else None
        n = 0
        while n < len(digests) and worker is not None and self._where.get(digests[n]) == worker:
            n += 1
        return worker, n * self.block_size

    def record(self, digests: list[bytes], worker: int) -> None:
        """`worker` prefills a prompt with these digests: it will hold them."""
        for d in digests:
            self._where[d] = worker
            self._where.move_to_end(d)
        while len(self._where) > self.capacity:
            self._where.popitem(last=False)
