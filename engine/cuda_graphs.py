"""The decode step as CUDA graphs, one per batch bucket (nano-vllm's scheme).

A decode step of B rows runs the same ~20 kernels per layer every time; launched one by one from
Python they cost far more host time than the GPU needs for them. So:
  1. At start-up: persistent device buffers for the inputs of the largest bucket (token ids,
     positions, cache slots, context lengths, block tables). For each bucket, largest first: one
     warm-up forward (Triton compiles its kernels), then one capture of the forward over the
     bucket's slice of the buffers, all graphs sharing one memory pool.
  2. Each decode step of B rows: the live rows and the padding rows up to the bucket (token 0,
     slot -1 → nothing stored, context 0 → attention of nothing) are written into pinned host
     staging and copied into the buffers in two copies; the bucket's graph is replayed; the
     first B rows of its logits are the answer. No host sync inside the step. A step that follows
     one still in flight takes its token ids from that step's sampled tokens on the device.
     A row's block table is written into the staging only when it differs from what that row
     held last step (a row keeps its request from step to step, whose table gains a block every
     block_size tokens); the kernels read a row's table only up to its context, so what lies
     beyond it (an earlier request's blocks, a padding row's) is never read.
  3. More rows than the largest bucket, a row with more than one new token, or a context longer
     than the buffers hold: the eager forward.
Needs the Triton attention backend (its kernels take slot -1 and context 0 as padding and do no
host work). With `capture=False` the same padded forward runs eagerly: that is how the CPU tests
check the buffers and the padding under Triton's interpreter.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.attention import BatchMeta

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner, SeqInput


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch (and max_batch itself)."""
    out = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return out + [max_batch]


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_batch: int, max_model_len: int, capture: bool) -> None:
        if runner.attn.name != "triton":
            raise ValueError(f"decode graphs need the triton attention backend, not {runner.attn.name}")
        self.runner = runner
        self.buckets = buckets(max_batch)
        self.max_batch = max_batch
        bs = runner.block_size
        self.width = -(-max_model_len // bs)  # block-table columns: the longest context, in blocks
        self.max_context = self.width * bs
        dev = runner.device
        pin = dev.type == "cuda"
        # rows: token id, position, slot, context length; each row [max_batch], contiguous
        self._cols = torch.zeros(4, max_batch, dtype=torch.long, device=dev)
        self._tables = torch.zeros(max_batch, self.width, dtype=torch.long, device=dev)  # [max_batch, W]
        self._h_cols = torch.zeros(4, max_batch, dtype=torch.long, pin_memory=pin)
        self._h_tables = torch.zeros(max_batch, self.width, dtype=torch.long, pin_memory=pin)
        self._np_cols, self._np_tables = self._h_cols.numpy(), self._h_tables.numpy()
        self._staged: list[list[int] | None] = [None] * max_batch  # each row's table in the staging (a copy)
        self._copied = torch.cuda.Event() if pin else None  # the staging may be reused once this fires
        self._meta = {b: self._bucket_meta(b) for b in self.buckets}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}  # [b, V] each: the graph's output buffer
        self.replays = 0
        if capture:
            self._capture()

    def _bucket_meta(self, b: int) -> BatchMeta:
        return BatchMeta(self._cols[0, :b], self._cols[1, :b], self._cols[2, :b], None, b,
                         self._tables[:b], self._cols[3, :b])

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        self._fill([], self.max_batch)  # every row padding: the warm-up forwards store nothing
        for b in reversed(self.buckets):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture stream (Triton compiles here)
                self.runner.run(self._meta[b])
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[b] = self.runner.run(self._meta[b])
            pool = graph.pool() if pool is None else pool
            self._graphs[b] = graph
        torch.cuda.synchronize()

    def fits(self, seqs: list[SeqInput]) -> bool:
        return (0 < len(seqs) <= self.max_batch and all(s.num_new == 1 and not s.adapter for s in seqs)
                and max(s.context_len for s in seqs) <= self.max_context)

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _fill(self, seqs: list[SeqInput], b: int) -> None:
        """Rows [0, len(seqs)) live, [len(seqs), b) padding; host staging → device buffers. The
        staging is written through numpy views (one slice assignment per column and per changed
        block table): torch element writes cost microseconds each, ~1.2 ms a step at 64 rows; and
        writing every row's table, ~75 µs of the ~95 µs this takes at 64 rows of 33 blocks here."""
        bs = self.runner.block_size
        cols, tables, staged = self._np_cols, self._np_tables, self._staged  # views of the pinned staging
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the staging
        n = len(seqs)
        pos = [s.start_pos for s in seqs]
        cols[0, :n] = [s.token_ids[0] for s in seqs]
        cols[1, :n] = pos
        cols[2, :n] = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)]
        cols[3, :n] = [s.context_len for s in seqs]
        cols[:2, n:b] = 0
        cols[2, n:b] = -1  # padding rows store nothing
        cols[3, n:b] = 0  # and attend to nothing
        for i, s in enumerate(seqs):
            table = s.block_table
            if table != staged[i]:  # a list compare: ~0.1 µs where the numpy write costs ~1
                table = table[: self.width]  # the blocks past the longest context are never read
                tables[i, : len(table)] = table
                staged[i] = list(table)
        self._cols[:, :b].copy_(self._h_cols[:, :b], non_blocking=True)
        self._tables[:b].copy_(self._h_tables[:b], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    @torch.inference_mode()
    def run(self, seqs: list[SeqInput], feed: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step through the bucket's graph (or its padded eager forward) → logits [B, V].
        feed: the previous step's sampled tokens, still on the device ([B'], engine/step_loop.py, a
        step in flight); each row's token_ids[0] is then the row of `feed` its token is, and the
        device gathers them after the copy: the host never waits for them.

        The logits are a view of the graph's output: queue what reads them before the next step."""
        b = self.bucket(len(seqs))
        self._fill(seqs, b)
        if feed is not None:
            n = len(seqs)
            self._cols[0, :n] = feed.index_select(0, self._cols[0, :n])
        self.replays += 1
        graph = self._graphs.get(b)
        if graph is None:  # capture=False: the same padded forward, eagerly
            return self.runner.run(self._meta[b])[: len(seqs)]
        graph.replay()
        return self._logits[b][: len(seqs)]
