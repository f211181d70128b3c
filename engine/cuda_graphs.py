"""A worker's steps as CUDA graphs, one per bucket of rows (nano-vllm's scheme, widened to prompt rows).

A step of B rows runs the same ~20 kernels per layer every time; launched one by one from
Python they cost far more host time than the GPU needs for them. So:
  1. At start-up: persistent device buffers for the inputs of the largest bucket (token ids,
     positions, cache slots, context lengths, the row whose logits each output row is, block
     tables) and one logits buffer. For each bucket, largest first: one warm-up forward (Triton
     compiles its kernels), then one capture of the forward over the bucket's slice of the buffers,
     all graphs sharing one memory pool; each graph copies its logits into the one buffer, so the
     graphs' outputs take the memory of one, not of every bucket.
  2. Each step: every new token is a row of the decode kernel — a decode row is one, a prompt
     chunk (aggregated steps, a decode worker's local prompts and recomputes) one row per token,
     each at its own position with its own context (position + 1): each layer stores every row's
     K/V before any row attends, so a chunk's row sees the rows before it, as the prompt kernel
     would have it (drafts, decode_worker/decode_rows.py, are rows the same way). The live rows
     and the padding rows up to the bucket (token 0, slot -1 → nothing stored, context 0 →
     attention of nothing) are written into pinned host staging and copied into the buffers in
     two copies; the bucket's graph is replayed; the logits of each sequence's last row are the
     answer. No host sync inside the step. A step that follows one still in flight takes its
     token ids from that step's sampled tokens on the device.
     A row's block table is written into the staging only when it differs from what that row
     held last step (a row keeps its request from step to step, whose table gains a block every
     block_size tokens); the kernels read a row's table only up to its context, so what lies
     beyond it (an earlier request's blocks, a padding row's) is never read.
  3. The eager forward instead: more rows than the largest bucket, a context longer than the
     buffers hold, or a step whose rows read more keys than the largest decode step does
     (max_batch rows at the longest context): the decode kernel reads a prompt row's keys once per
     row where the prompt kernel reads them once per tile of 32 rows, so a chunk deep in a long
     prompt may cost more as rows than the eager forward's launches save (bench/mixed_step.py).
Needs the Triton attention backend (its kernels take slot -1 and context 0 as padding and do no
host work). With `capture=False` the same padded forward runs eagerly: that is how the CPU tests
check the buffers and the padding under Triton's interpreter.
"""
from __future__ import annotations

from itertools import accumulate
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.attention import BatchMeta

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner, SeqInput


def buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_rows (and max_rows itself)."""
    out = [b for b in (1, 2, 4, 8) if b < max_rows] + list(range(16, max_rows, 16))
    return out + [max_rows]


def rows_of(seqs: list[SeqInput]) -> int:
    """The rows a step takes in the graphs: one per new token."""
    return sum(len(s.token_ids) for s in seqs)


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_batch: int, max_model_len: int, capture: bool,
                 max_rows: int = 0) -> None:
        """max_batch: the most decode rows a step has (their keys at the longest context bound a
        graphed step's attention, 3.); max_rows: the largest step, in new tokens, the graphs take
        (0: max_batch)."""
        if runner.attn.name != "triton":
            raise ValueError(f"decode graphs need the triton attention backend, not {runner.attn.name}")
        self.runner = runner
        max_rows = max(max_rows, max_batch)
        self.buckets = buckets(max_rows)
        self.max_rows = max_rows
        bs = runner.block_size
        self.width = -(-max_model_len // bs)  # block-table columns: the longest context, in blocks
        self.max_context = self.width * bs
        self.max_keys = max_batch * max_model_len  # what the largest decode step's rows read (3.)
        dev = runner.device
        pin = dev.type == "cuda"
        # rows: token id, position, slot, context length, the row whose logits output row i is; each [max_rows]
        self._cols = torch.zeros(5, max_rows, dtype=torch.long, device=dev)
        self._tables = torch.zeros(max_rows, self.width, dtype=torch.long, device=dev)  # [max_rows, W]
        self._h_cols = torch.zeros(5, max_rows, dtype=torch.long, pin_memory=pin)
        self._h_tables = torch.zeros(max_rows, self.width, dtype=torch.long, pin_memory=pin)
        self._np_cols, self._np_tables = self._h_cols.numpy(), self._h_tables.numpy()
        self._iota = np.arange(max_rows)  # each decode row's logits: its own row
        self._staged: list[list[int] | None] = [None] * max_rows  # each row's table in the staging (a copy)
        self._copied = torch.cuda.Event() if pin else None  # the staging may be reused once this fires
        self._meta = {b: self._bucket_meta(b) for b in self.buckets}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: torch.Tensor | None = None  # [max_rows, V]: every graph's output (_capture)
        self.replays = 0
        if capture:
            self._capture()

    def _bucket_meta(self, b: int) -> BatchMeta:
        return BatchMeta(self._cols[0, :b], self._cols[1, :b], self._cols[2, :b], self._cols[4, :b], b,
                         self._tables[:b], self._cols[3, :b])

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        self._fill([], self.max_rows)  # every row padding: the warm-up forwards store nothing
        for b in reversed(self.buckets):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture stream (Triton compiles here)
                warm = self.runner.run(self._meta[b])  # [b, V]
            torch.cuda.current_stream().wait_stream(side)
            if self._logits is None:  # (the largest bucket's: V as the LM head gives it)
                self._logits = torch.empty(self.max_rows, warm.shape[-1], dtype=warm.dtype, device=warm.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[:b].copy_(self.runner.run(self._meta[b]))  # (the forward's own output: freed to the pool)
            pool = graph.pool() if pool is None else pool
            self._graphs[b] = graph
        torch.cuda.synchronize()

    def fits(self, seqs: list[SeqInput]) -> bool:
        if not seqs or any(s.adapter for s in seqs) or max(s.context_len for s in seqs) > self.max_context:
            return False
        if all(len(s.token_ids) == 1 for s in seqs):  # decode rows (and drafts) only
            return len(seqs) <= self.max_rows
        rows = rows_of(seqs)
        # the keys the rows read: a sequence's n rows from start read start + 1 ... start + n of them
        keys = sum(s.num_new * s.start_pos + s.num_new * (s.num_new + 1) // 2 for s in seqs)
        return rows <= self.max_rows and keys <= self.max_keys

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _fill(self, seqs: list[SeqInput], b: int) -> None:
        """Rows [0, rows_of(seqs)) live (each sequence's new tokens in order), [rows, b) padding; each
        sequence's logits from its last row; host staging → device buffers. The staging is written
        through numpy views (one slice assignment per column and per changed block table): torch
        element writes cost microseconds each, ~1.2 ms a step at 64 rows; and writing every row's
        table, ~75 µs of the ~95 µs this takes at 64 rows of 33 blocks here."""
        bs = self.runner.block_size
        cols, tables, staged = self._np_cols, self._np_tables, self._staged  # views of the pinned staging
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the staging
        n = rows_of(seqs)
        if n == len(seqs):  # decode rows: one each
            pos = [s.start_pos for s in seqs]
            cols[0, :n] = [s.token_ids[0] for s in seqs]
            cols[2, :n] = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)]
            cols[4, :n] = self._iota[:n]
            row_seqs = seqs
        else:  # a prompt chunk's tokens: a row each
            pos = [p for s in seqs for p in range(s.start_pos, s.context_len)]
            cols[0, :n] = [t for s in seqs for t in s.token_ids]
            cols[2, :n] = [s.block_table[p // bs] * bs + p % bs for s in seqs for p in range(s.start_pos, s.context_len)]
            cols[4, : len(seqs)] = [end - 1 for end in accumulate(len(s.token_ids) for s in seqs)]  # last rows
            row_seqs = [s for s in seqs for _ in s.token_ids]
        cols[1, :n] = pos
        np.add(cols[1, :n], 1, out=cols[3, :n])  # a row's context: the positions up to its own
        cols[:2, n:b] = 0
        cols[2, n:b] = -1  # padding rows store nothing
        cols[3, n:b] = 0  # and attend to nothing
        cols[4, len(seqs):b] = 0
        for i, s in enumerate(row_seqs):
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
        """One step through the bucket's graph (or its padded eager forward) → the logits of each
        sequence's last token [len(seqs), V]. feed: the previous step's sampled tokens, still on the
        device ([B'], engine/step_loop.py, a step in flight; decode rows only); each row's
        token_ids[0] is then the row of `feed` its token is, and the device gathers them after the
        copy: the host never waits for them.

        The logits are a view of the graphs' output buffer: queue what reads them before the next step."""
        n = rows_of(seqs)
        b = self.bucket(n)
        self._fill(seqs, b)
        if feed is not None:
            self._cols[0, :n] = feed.index_select(0, self._cols[0, :n])
        self.replays += 1
        graph = self._graphs.get(b)
        if graph is None:  # capture=False: the same padded forward, eagerly
            return self.runner.run(self._meta[b])[: len(seqs)]
        graph.replay()
        assert self._logits is not None
        return self._logits[: len(seqs)]

