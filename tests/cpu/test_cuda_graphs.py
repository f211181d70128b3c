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
    """6 sequences finishing at different steps: batches of 6 and 5 (> largest bucket 4: eager), 4, 3
    (bucket 4, one padding row), 2, 1 — each sequence == HF generate."""
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randint(1, 40))] for _ in range(6)]
    lengths = [2, 3, 4, 5, 6, 7]  # tokens to generate per sequence: one fewer live row each step
    model = MODEL if arch == "llama" else tiny_model(arch=arch)
    runner = ModelRunner(model, num_blocks=64, block_size=8, kernels="triton")
    runner.attn.num_sms = num_sms  # type: ignore[union-attr]
    runner.use_decode_graphs(max_batch=4, max_model_len=64, capture=False)
    graphs = runner.graphs
    assert graphs is not None
    tables = [list(range(i * 8, i * 8 + 8))[::-1] for i in range(6)]  # reversed: not position order
    out = [[int(r.argmax())] for r in runner.forward([SeqInput(p, 0, t) for p, t in zip(prompts, tables)])]
    assert graphs.replays == 0  # the prompts: more rows than the largest bucket, eager
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
    assert seen_batches == [6, 5, 4, 3, 2, 1]  # the eager fallback, full and padded buckets all ran
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


def _eager_and_graphed(max_batch: int, max_rows: int, model_len: int, arch: str = "llama"
                       ) -> tuple[torch.nn.Module, ModelRunner, ModelRunner]:
    model = MODEL if arch == "llama" else tiny_model(arch=arch)
    eager = ModelRunner(model, num_blocks=64, block_size=8, kernels="triton")
    graphed = ModelRunner(model, num_blocks=64, block_size=8, kernels="triton")
    graphed.use_decode_graphs(max_batch, model_len, capture=False, max_rows=max_rows)
    return model, eager, graphed


# mistral: a sliding window of 16 across a chunk's rows; deepseek_v2: latent attention's decode kernel
@pytest.mark.parametrize("arch", ["llama", "mistral", "deepseek_v2"])
def test_prompt_chunks_run_as_rows_of_the_graphs_with_the_eager_forwards_logits(arch: str) -> None:
    """A step of decode rows and prompt chunks (a whole prompt, a later chunk of one, a one-token
    prompt) is a bucket's rows, a token each: the logits of every sequence's last token are the eager
    forward's (its prompt kernel), the cache holds the same K/V, and the tokens then decode as HF's."""
    rng = random.Random(7)
    model, eager, graphed = _eager_and_graphed(max_batch=4, max_rows=48, model_len=256, arch=arch)
    prompts = [[rng.randrange(3, 259) for _ in range(n)] for n in (9, 20, 1, 11)]
    tables = [list(range(i * 8, i * 8 + 8))[::-1] for i in range(4)]
    first = [SeqInput(prompts[0], 0, tables[0]), SeqInput(prompts[1][:12], 0, tables[1])]  # 21 rows
    for runner in (eager, graphed):
        a = runner.forward(first)
    assert graphed.graphs is not None and graphed.graphs.replays == 1
    out = [[int(a[0].argmax())], [], [], []]
    # a decode row, prompt 1's later chunk (12 positions before it), prompts 2 and 3 whole: 1 + 8 + 1 + 11 rows
    step = [SeqInput(out[0], 9, tables[0]), SeqInput(prompts[1][12:], 12, tables[1]),
            SeqInput(prompts[2], 0, tables[2]), SeqInput(prompts[3], 0, tables[3])]
    want, got = eager.forward(step), graphed.forward(step)
    assert graphed.graphs.replays == 2
    assert got.shape == want.shape == (4, model.config.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(graphed.kv, eager.kv, rtol=1e-5, atol=1e-5)  # the same K/V in the same slots
    out[0].append(int(got[0].argmax()))
    for i in (1, 2, 3):
        out[i].append(int(got[i].argmax()))
    for _ in range(2):  # decode rows through the graphs
        rows = [SeqInput([o[-1]], len(p) + len(o) - 1, t) for p, o, t in zip(prompts, out, tables)]
        for i, row in enumerate(graphed.forward(rows)):
            out[i].append(int(row.argmax()))
    assert out == [_hf(p, len(o), model) for p, o in zip(prompts, out)]


def test_a_step_past_the_rows_or_keys_the_graphs_take_runs_eagerly() -> None:
    """Rows: at most max_rows; keys read: at most max_batch rows at max_model_len (a chunk deep in a
    long prompt reads its context once per row)."""
    _, _, graphed = _eager_and_graphed(max_batch=2, max_rows=32, model_len=64)
    g = graphed.graphs
    assert g is not None and g.buckets == [1, 2, 4, 8, 16, 32] and g.max_keys == 2 * 64
    assert g.fits([SeqInput([1] * 15, 0, [0, 1])])  # 15 rows read 1 + ... + 15 = 120 keys
    assert not g.fits([SeqInput([1] * 16, 0, [0, 1])])  # 136 keys
    assert not g.fits([SeqInput([1] * 4, 40, list(range(6)))])  # 4 rows deep in a prompt: 170 keys
    assert g.fits([SeqInput([1], 63, list(range(8))), SeqInput([2], 63, list(range(8, 16)))])  # decode rows at the end
    assert not g.fits([SeqInput([1] * 8, 0, [0], adapter="a")])  # LoRA rows: eager
    assert not g.fits([SeqInput([1], 64, list(range(9)))])  # past the buffers' longest context


def test_the_buffers_hold_a_chunks_rows_and_each_sequences_last_row() -> None:
    runner = ModelRunner(MODEL, num_blocks=64, block_size=4, kernels="triton")
    runner.use_decode_graphs(2, 64, capture=False, max_rows=16)
    g = runner.graphs
    assert g is not None
    d, c, p = SeqInput([5], 6, [3, 9]), SeqInput([7, 8, 9], 3, [12, 2]), SeqInput([4, 4], 0, [20])
    g._fill([d, c, p], 8)
    cols = g._cols[:, :8].tolist()  # bucket 8: 6 rows, 2 padding
    assert cols[0] == [5, 7, 8, 9, 4, 4, 0, 0]  # tokens
    assert cols[1] == [6, 3, 4, 5, 0, 1, 0, 0]  # positions
    assert cols[2] == [9 * 4 + 2, 12 * 4 + 3, 2 * 4, 2 * 4 + 1, 80, 81, -1, -1]  # slots (padding: none)
    assert cols[3] == [7, 4, 5, 6, 1, 2, 0, 0]  # contexts: each row up to its own position
    assert cols[4][:3] == [0, 3, 5]  # the last row of each sequence: its logits
    assert g._tables[1:4, :2].tolist() == [[12, 2]] * 3 and g._tables[4, 0] == 20
