"""The CUDA attention kernels (engine/triton_attention.py), run by Triton's interpreter on CPU,
against torch SDPA over the same paged cache: decode, packed prefill, later chunks, GQA, odd head
dims, block sizes smaller and larger than a key tile, padded rows, sliding windows, soft-capped scores,
attention sinks."""
import pytest
import torch
import torch.nn.functional as F

tat = pytest.importorskip("engine.triton_attention")


def _cache(nb: int, bs: int, kvh: int, d: int, dtype: torch.dtype, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(nb, bs, kvh, d, generator=g).to(dtype), torch.randn(nb, bs, kvh, d, generator=g).to(dtype))


def _gather(cache: torch.Tensor, table: list[int], n: int) -> torch.Tensor:
    """[n, kv_heads, d]: positions [0, n) of a sequence through its block table."""
    bs = cache.shape[1]
    return torch.stack([cache[table[p // bs], p % bs] for p in range(n)])


def _ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: list[int], scale: float,
         window: int = 0, softcap: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [n, H, d] at positions qpos; k, v [ctx, KVH, d] → [n, H, d], causal by position (and with
    `window`: keys > query - window, Hugging Face's sliding window; with `softcap`: each score s
    replaced by softcap · tanh(s / softcap), Gemma 2's; with `sinks` [H]: one more logit per head in
    the softmax, its share dropped, gpt-oss's), fp32."""
    keys, queries = torch.arange(k.shape[0])[None, :], torch.tensor(qpos)[:, None]
    mask = (keys <= queries) & ((keys > queries - window) if window else True)
    qh, kh, vh = q.float().transpose(0, 1), k.float().transpose(0, 1), v.float().transpose(0, 1)  # [heads, n|ctx, d]
    if not softcap and sinks is None:
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
        return o.transpose(0, 1)
    g = qh.shape[0] // kh.shape[0]
    scores = qh @ kh.repeat_interleave(g, 0).transpose(1, 2) * scale  # [H, n, ctx]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks[:, None, None].expand(-1, scores.shape[1], 1)], dim=-1)
        return (scores.softmax(-1)[..., :-1] @ vh.repeat_interleave(g, 0)).transpose(0, 1)
    return (scores.softmax(-1) @ vh.repeat_interleave(g, 0)).transpose(0, 1)


CASES = [  # block_size, heads, kv_heads, head_dim, dtype, tolerance
    (16, 4, 2, 32, torch.float32, 2e-5),
    (4, 8, 2, 80, torch.float32, 2e-5),
    (32, 6, 6, 16, torch.float32, 2e-5),
    (16, 8, 1, 64, torch.float16, 1e-2),  # bf16: on a GPU only (tests/gpu); the interpreter's bf16 dot is wrong
]


@pytest.mark.parametrize("splits, window, cap, sink", [(1, 0, 0, 0), (3, 0, 0, 0), (8, 0, 0, 0), (1, 21, 0, 0),
                                                       (3, 21, 0, 0), (3, 21, 2.0, 0), (1, 0, 0, 1), (8, 0, 0, 1),
                                                       (3, 21, 0, 1)])  # 8: more splits than some contexts have
@pytest.mark.parametrize("bs,H,KVH,D,dtype,tol", CASES)  # key tiles; 21: a sliding window; 2.0: a score cap;
def test_paged_decode_matches_sdpa(bs: int, H: int, KVH: int, D: int, dtype: torch.dtype, tol: float,  # sinks
                                   splits: int, window: int, cap: float, sink: int) -> None:
    g = torch.Generator().manual_seed(bs * 100 + H)
    kc, vc = _cache(40, bs, KVH, D, dtype, g)
    lens = [1, bs, 3 * bs + 5, 70, 0]  # the last one: a padded row
    tables = [torch.randperm(40, generator=g)[: -(-max(n, 1) // bs)].tolist() for n in lens]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(lens), H, D, generator=g).to(dtype)
    scale = D ** -0.5
    sinks = torch.randn(H, generator=g) * 2 if sink else None  # float32 [H]
    out = tat.paged_decode(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32), scale, block_n=16, splits=splits,
                           window=window, softcap=cap, sinks=sinks)
    for i, n in enumerate(lens):
        if n == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i]))
            continue
        ref = _ref(q[i : i + 1], _gather(kc, tables[i], n), _gather(vc, tables[i], n), [n - 1], scale, window, cap,
                   sinks)
        torch.testing.assert_close(out[i : i + 1].float(), ref, atol=tol, rtol=tol)


def test_decode_splits_fill_the_sms_and_stop_splitting_once_the_batch_does() -> None:
    assert tat.decode_splits(1, 4, 132) == 16  # 4 programs: split, capped at 16
    assert tat.decode_splits(4, 4, 132) == 9  # 16 programs × 9 ≥ 132
    assert tat.decode_splits(33, 4, 132) == 1  # 132 programs already
    assert tat.decode_splits(64, 8, 132) == 1


@pytest.mark.parametrize("window, cap, sink", [(0, 0, 0), (7, 0, 0), (20, 0, 0), (7, 2.0, 0), (0, 0, 1),
                                               (7, 0, 1)])  # windows shorter than a key tile and longer;
@pytest.mark.parametrize("bs,H,KVH,D,dtype,tol", CASES)  # 2.0: a score cap; sinks
def test_paged_prefill_matches_sdpa(bs: int, H: int, KVH: int, D: int, dtype: torch.dtype, tol: float,
                                    window: int, cap: float, sink: int) -> None:
    """Whole prompts (start 0) and later chunks (start > 0, earlier positions already cached)."""
    g = torch.Generator().manual_seed(bs + H + D)
    kc, vc = _cache(64, bs, KVH, D, dtype, g)
    seqs = [(0, 1), (0, 37), (21, 16), (5, 3), (0, 9)]  # (start_pos, num_new)
    tables = [torch.randperm(64, generator=g)[: -(-(s + n) // bs)].tolist() for s, n in seqs]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    T = sum(n for _, n in seqs)
    q = torch.randn(T, H, D, generator=g).to(dtype)
    cu = torch.tensor([0] + [sum(n for _, n in seqs[: i + 1]) for i in range(len(seqs))], dtype=torch.int32)
    ts, tm = tat.prefill_tiles([n for _, n in seqs], block_m=16)
    sinks = torch.randn(H, generator=g) * 2 if sink else None  # float32 [H]
    out = tat.paged_prefill(q, kc, vc, bt, cu, torch.tensor([s for s, _ in seqs], dtype=torch.int32),
                            torch.tensor(ts, dtype=torch.int32), torch.tensor(tm, dtype=torch.int32),
                            D ** -0.5, block_m=16, block_n=16, window=window, softcap=cap, sinks=sinks)
    off = 0
    for (s, n), table in zip(seqs, tables):
        ref = _ref(q[off : off + n], _gather(kc, table, s + n), _gather(vc, table, s + n), list(range(s, s + n)),
                   D ** -0.5, window, cap, sinks)
        torch.testing.assert_close(out[off : off + n].float(), ref, atol=tol, rtol=tol)
        off += n
