"""The CUDA-graph decode path's buffers and padding (engine/cuda_graphs.py), run on CPU with the
same Triton kernels under the interpreter and no capture: every step goes through the persistent
buffers padded to its bucket; the tokens must equal HF generate and padding must store nothing."""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from engine.cuda_graphs import buckets  # noqa: E402
from engine.model_runner import ModelRunner, SeqInput  # noqa: E402
from engine.tiny import tiny_model  # noqa: E402

MODEL = tiny_model()


def _hf(prompt: list[int], n: int, model: torch.nn.Module = MODEL) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_buckets_are_nano_vllms() -> None:
    assert buckets(1) == [1]
    assert buckets(6) == [1, 2, 4, 6]
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert buckets(40) == [1, 2, 4, 8, 16, 32, 40]


# 16 SMs: small batches split their keys (flash-decoding); qwen3_moe: padding rows pick experts too;
# mistral: a sliding window of 16 (split too); deepseek_v2: latent attention's kernels (engine/triton_mla.py)
@pytest.mark.parametrize("num_sms, arch", [(1, "llama"), (16, "llama"), (1, "qwen3_moe"), (16, "mistral"),
                                           (16, "deepseek_v2")])
def test_graph_path_decodes_like_hf_across_buckets_and_the_eager_fallback(num_sms: int, arch: str) -> None:
    """6 sequences finishing at different steps: batches of 6 (> largest bucket 4: eager), 5, 3 (bucket 4,
    one padding row), 2, 1 — each sequence == HF generate."""
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randint(1, 40))] for _ in range(6)]
    lengths = [3, 5, 7, 8, 10, 12]  # tokens to generate per sequence
    model = MODEL if arch == "llama" else tiny_model(arch=arch)
    runner = ModelRunner(model, num_blocks=64, block_size=8, kernels="triton")
    runner.attn.num_sms = num_sms  # type: ignore[union-attr]
    runner.use_decode_graphs(max_batch=4, max_model_len=64, capture=False)
    graphs = runner.graphs
    assert graphs is not None
    tables = [list(range(i * 8, i * 8 + 8))[::-1] for i in range(6)]  # reversed: not position order
    out = [[int(r.argmax())] for r in runner.forward([SeqInput(p, 0, t) for p, t in zip(prompts, tables)])]
    assert graphs.replays == 0  # prompts never take the graph path
    seen_batches = []
    while True:
        live = [i for i in range(6) if len(out[i]) < lengths[i]]
        if not live:
            break
        seen_batches.append(len(live))
        rows = [SeqInput([out[i][-1]], len(prompts[i]) + len(out[i]) - 1, tables[i]) for i in live]
        logits = runner.forward(rows)
        assert logits.shape == (len(live), model.config.vocab_size)
        for i, row in zip(live, logits):
            out[i].append(int(row.argmax()))
    assert [o for o in out] == [_hf(p, n, model) for p, n in zip(prompts, lengths)]
    assert 6 in seen_batches and 3 in seen_batches  # the eager fallback and a padded bucket both ran
    assert graphs.replays == sum(1 for b in seen_batches if b <= 4)


def test_padding_rows_store_nothing_and_leave_other_blocks_alone() -> None:
    runner = ModelRunner(MODEL, num_blocks=16, block_size=4, kernels="triton")
    runner.use_decode_graphs(max_batch=8, max_model_len=32, capture=False)
    runner.kv.normal_()  # any content: the step must change exactly the 3 rows' new slots
    before = runner.kv.clone()
    rows = [SeqInput([5], 6, [3, 9]), SeqInput([7], 0, [12]), SeqInput([9], 13, [0, 1, 2, 15])]
    runner.forward(rows)  # bucket 4: one padding row
    written = {9 * 4 + 2, 12 * 4 + 0, 15 * 4 + 1}
    changed = (runner.kv != before).flatten(4).any(-1).any(0).any(0).flatten()  # [num_blocks * block_size]
    assert set(changed.nonzero().flatten().tolist()) == written


def test_the_buffers_hold_every_rows_inputs_as_rows_change_requests_and_tables_change() -> None:
    """Block tables are written into the staging only when a row's table changed: after each step
    the device buffers must still hold, for every live row, its token, position, slot, context and
    its table up to its context — through a table that grows, one changed in place (a shared prefix
    block swapped in), rows taken over by other requests, a batch that shrinks and grows again,
    and a table longer than its context (upfront allocation) whose context crosses into its blocks."""
    runner = ModelRunner(MODEL, num_blocks=64, block_size=4, kernels="triton")
    runner.use_decode_graphs(max_batch=8, max_model_len=64, capture=False)
    g = runner.graphs
    assert g is not None
    a, b, c, d = [3, 7], [9, 1, 4], [20, 21, 22, 23, 24], [30]

    def check(rows: list[SeqInput]) -> None:
        n = g.bucket(len(rows))
        g._fill(rows, n)
        cols, tables = g._cols.tolist(), g._tables
        for i, s in enumerate(rows):
            p = s.start_pos
            assert [cols[0][i], cols[1][i], cols[2][i], cols[3][i]] == [
                s.token_ids[0], p, s.block_table[p // 4] * 4 + p % 4, s.context_len]
            nblk = -(-s.context_len // 4)
            assert tables[i, :nblk].tolist() == s.block_table[:nblk], (i, s)
        assert cols[2][len(rows):n] == [-1] * (n - len(rows)) and cols[3][len(rows):n] == [0] * (n - len(rows))

    check([SeqInput([5], 7, a), SeqInput([6], 8, b), SeqInput([8], 3, c)])
    a.append(11)  # a's next token starts a block
    check([SeqInput([5], 8, a), SeqInput([6], 9, b), SeqInput([8], 4, c)])
    b[0] = 40  # changed in place (the same list object)
    check([SeqInput([5], 9, a), SeqInput([6], 10, b), SeqInput([8], 5, c)])
    check([SeqInput([6], 10, b), SeqInput([8], 6, c)])  # a ended: b and c moved up a row
    check([SeqInput([1], 0, d), SeqInput([6], 11, b), SeqInput([8], 7, c), SeqInput([5], 9, a)])
    check([SeqInput([8], 8, c), SeqInput([1], 1, d)])  # c's context reaches its third block
    check([SeqInput([8], 16, c), SeqInput([1], 2, d)])  # ... and its fifth, written once, never rewritten
