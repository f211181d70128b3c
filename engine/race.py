"""The draw of the sampler: temperature → top-k → top-p → min-p → one token per row, no sort in the
common case.

The draw is an exponential race: token = argmax(p / E) over the tokens a row keeps, E ~ Exp(1) per
token, which picks token i with probability p_i (any positive scale of p; a dropped token never
wins). E is a counter-based hash of (row key, token id), so a row's token depends on its key and
its logits only, never on the rest of the batch. Each row takes the cheapest way that gives the same
token as sorting its whole vocabulary (_filter_sorted, the reference and the fallback):
1. top-k (0 < k <= CANDIDATES): the race among the row's best CANDIDATES + 1 tokens (one top-k);
2. everything else with k == 0 — temperature, top-p, min-p: the race over the whole vocabulary,
   then the best RACERS racers walked in order; the first inside the nucleus (the tokens more
   probable than it hold less than top_p) and above min-p is the nucleus race's winner;
3. a row whose k-th token ties beyond its candidates, whose top_k > CANDIDATES, none of whose
   walked racers is kept (about (1 - top_p)^RACERS of top-p rows) or whose top-p is too flat to
   check cheaply (more than HEAD tokens above its lowest racer): sorted whole.
Up to three host syncs when a row takes way 1 or 2 (which rows fall through to 3), none otherwise.
draw_sorted() takes way 3 for every row — the same tokens with no host sync at all, what a decode
step left in flight draws (engine/sampler.py sample_queued); parameters reach the device through
pinned copies (on_device), which do not wait for the work queued before them.
"""
from __future__ import annotations

import torch

from engine.types import GREEDY_BELOW, SamplingParams

M32 = 0xFFFFFFFF
CANDIDATES = 256  # the largest top_k raced among its best tokens (CANDIDATES + 1 of them) without a sort
RACERS = 8  # racers a row walks looking for the first one it keeps
HEAD = 16384  # the most tokens above a row's lowest racer that way 2 gathers; more: sorted whole


def on_device(values: list | torch.Tensor, device: torch.device) -> torch.Tensor:  # type: ignore[type-arg]
    """A host list or CPU tensor → a tensor on `device` (a list's dtype inferred) without waiting for
    the device: on CUDA a pinned copy queued on the stream, where a pageable one waits for all the
    work queued before it (a step in flight's forward, engine/step_loop.py)."""
    if device.type != "cuda":
        return torch.as_tensor(values, device=device)
    host = values.pin_memory() if isinstance(values, torch.Tensor) else torch.tensor(values, pin_memory=True)
    return host.to(device, non_blocking=True)


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for h < 2^32 without int64 overflow (16-bit halves of c)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer: every input bit flips each output bit with probability ~1/2."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _as_int32(h: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 → the same 32 bits as int32."""
    return torch.where(h >= 1 << 31, h - (1 << 32), h).to(torch.int32)


_token_hashes: dict[tuple[int, torch.device], torch.Tensor] = {}


def exponentials(keys: torch.Tensor, vocab: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """keys [R] (int64 < 2^32) → Exp(1) noise, a pure function of (key, token id): for every token
    of the vocabulary [R, V], or for the token ids given [R, K] (the values those tokens get in [R, V]).

    Row and token ids are each fully mixed once (the token side cached per vocabulary); their xor
    gets one more multiply-xorshift round. That round runs on int32 holding the uint32 bits (int32
    multiplication wraps mod 2^32 on CPU and CUDA; shifts are masked to be logical), a few passes
    over [R, V] in place."""
    tok = _token_hashes.get((vocab, keys.device))
    if tok is None:
        tok = _as_int32(_fmix32(torch.arange(vocab, device=keys.device, dtype=torch.long) + 0x9E3779B9 & M32))  # [V]
        _token_hashes[(vocab, keys.device)] = tok
    h = _as_int32(_fmix32(keys))[:, None] ^ (tok[None, :] if ids is None else tok[ids])  # [R, V] or [R, K]
    h.mul_(0x2C1B3C6D)  # < 2^31: an int32 scalar
    h.bitwise_xor_((h >> 15).bitwise_and_(0x1FFFF))
    u = h.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF).float().add_(0.5).mul_(1.0 / (1 << 24))  # in (0, 1)
    return u.log_().neg_()


def _scaled(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [R, V] → (logits - row max) / temperature: <= 0 everywhere, 0 at the best (no overflow)."""
    temp = on_device([[max(p.temperature, GREEDY_BELOW)] for p in params], x.device)
    return (x - x.max(dim=-1, keepdim=True).values).div_(temp)


def _min_p(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """probs [R, N], any positive scale per row: drop what is below min_p × the row's best."""
    min_p = on_device([[p.min_p] for p in params], probs.device)
    return probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)


def take_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t[rows] along dim 0, without a copy when rows are all of t's rows in order."""
    if rows == list(range(t.shape[0])):
        return t
    return t.index_select(0, on_device(rows, t.device))


def _race(probs: torch.Tensor, keys: torch.Tensor, vocab: int, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [R, N] over all tokens (ids None) or over token ids [R, N] → (token [R], ok [R]).

    ok: the row's distribution is finite and not empty (else the caller keeps its best raw token)."""
    noise = exponentials(keys, vocab, ids)
    best = torch.div(probs, noise, out=noise).argmax(dim=-1)  # [R]
    token = best if ids is None else ids.gather(1, best[:, None])[:, 0]
    total = probs.sum(dim=-1)  # NaN or inf if any entry is
    return token, torch.isfinite(total) & (total > 0)


def _filter_sorted(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Top-k, top-p, min-p on scaled logits [R, V] by a sort of each whole row → probabilities [R, V]."""
    V = x.shape[1]
    top_k = [p.top_k if 0 < p.top_k < V else 0 for p in params]
    top_p = [p.top_p for p in params]
    if any(top_k) or any(tp < 1.0 for tp in top_p):
        sorted_x, order = torch.sort(x, dim=-1, descending=True)  # [R, V]
        k = on_device(top_k, x.device)
        kth = sorted_x.gather(1, (k - 1).clamp(min=0)[:, None])  # [R, 1]
        keep_k = (k[:, None] == 0) | (sorted_x >= kth)
        sorted_x = sorted_x.masked_fill(~keep_k, float("-inf"))
        probs = torch.softmax(sorted_x, dim=-1)
        tp = on_device(top_p, x.device)[:, None]
        # keep the smallest prefix whose mass reaches top_p (always the best token); top_p 1: keep all
        drop = (probs.cumsum(-1) - probs >= tp) & (tp < 1.0)
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(1, order, sorted_x)
    return _min_p(torch.softmax(x, dim=-1), params)


def _top_k(x: torch.Tensor, params: list[SamplingParams], keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Way 1. Scaled logits [R, V] of rows with 0 < top_k <= CANDIDATES → (token [R], ok [R], fits [R]).

    fits: the k-th token's ties all lie inside the candidates (else the row must be sorted whole).
    Top-p then reads the top-k distribution, min-p the kept tokens: as _filter_sorted does."""
    V = x.shape[1]
    K = min(V, CANDIDATES + 1)  # one more than any k, to see whether the k-th token ties beyond
    vals, ids = torch.topk(x, K, dim=-1)  # [R, K], best first
    k = on_device([min(p.top_k, K) for p in params], x.device)  # [R]
    kth = vals.gather(1, (k - 1)[:, None])  # [R, 1]
    e = vals.exp().masked_fill(vals < kth, 0.0)  # [R, K]: the top-k, ties with the k-th included
    probs = e / e.sum(-1, keepdim=True)
    tp = on_device([[p.top_p] for p in params], x.device)  # [R, 1]
    drop = (probs.cumsum(-1) - probs >= tp) & (tp < 1.0)  # [R, K]
    fits = (vals[:, -1] < kth[:, 0]) | (K == V)
    token, ok = _race(_min_p(probs.masked_fill(drop, 0.0), params), keys, V, ids)
    return token, ok, fits


def _nucleus(x: torch.Tensor, params: list[SamplingParams], keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Way 2. Scaled logits [R, V] of rows without top-k → (token [R], ok [R], found [R]).

    The race runs over every token; its RACERS best are walked in race order and the first the row
    keeps wins. Token j is kept when the tokens above it hold less than top_p of the mass (top_p 1:
    all) and e_j >= min_p (e = exp(x) is 1 at the best token). Only tokens above a row's lowest
    racer add to those masses — usually a few hundred, gathered once; a row with more than HEAD of
    them (a flat distribution) is not looked at.
    found: a walked racer was kept (else the row must be sorted whole)."""
    R, V = x.shape
    M = min(V, RACERS)
    e = x.exp()  # [R, V], best token 1
    total = e.sum(-1)  # [R]
    noise = exponentials(keys, V)  # [R, V]
    racers = torch.topk(torch.div(e, noise, out=noise), M, dim=-1).indices  # [R, M], race order
    rx = x.gather(1, racers)  # [R, M]
    kept = e.gather(1, racers) >= on_device([[p.min_p] for p in params], x.device)  # [R, M]
    if any(p.top_p < 1.0 for p in params):
        head = x > rx.min(dim=-1, keepdim=True).values  # [R, V]: tokens above the lowest racer
        small = head.sum(-1) <= HEAD  # [R]
        rows, cols = (head & small[:, None]).nonzero(as_tuple=True)  # [N] each
        vals, mass = x[rows, cols], e[rows, cols]  # [N]
        above = torch.stack([torch.zeros(R, device=x.device).index_add_(0, rows, mass * (vals > rx[rows, m]))
                             for m in range(M)], dim=-1)  # [R, M]: the mass above each racer
        tp = on_device([[p.top_p] for p in params], x.device)  # [R, 1]
        kept &= (tp >= 1.0) | ((above < tp * total[:, None]) & small[:, None])
    first = kept.to(torch.int8).argmax(dim=-1)  # [R]: the first kept racer (0 if none)
    return racers.gather(1, first[:, None])[:, 0], torch.isfinite(total), kept.any(dim=-1)


def draw_sorted(logits: torch.Tensor, params: list[SamplingParams], keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """draw() by way 3 for every row: the same (token [R], ok [R]), queued on the device with no host
    sync (a sort of each row with top-k or top-p; temperature and min-p alone need none)."""
    return _race(_filter_sorted(_scaled(logits, params), params), keys, logits.shape[1])


def draw(logits: torch.Tensor, params: list[SamplingParams], keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] of rows that draw, keys [R] → (token [R], ok [R]); ok false: the row's
    distribution came out non-finite or empty (the caller falls back to its best raw token)."""
    R, V = logits.shape
    x = _scaled(logits, params)  # [R, V]
    token = torch.zeros(R, dtype=torch.long, device=logits.device)
    ok = torch.zeros(R, dtype=torch.bool, device=logits.device)
    by_top_k = [i for i, p in enumerate(params) if 0 < p.top_k <= CANDIDATES and p.top_k < V]
    by_race = [i for i, p in enumerate(params) if not 0 < p.top_k < V]
    whole = sorted(set(range(R)) - set(by_top_k) - set(by_race))
    for rows, way in ((by_top_k, _top_k), (by_race, _nucleus)):
        if rows:
            t, o, done = way(take_rows(x, rows), [params[i] for i in rows], take_rows(keys, rows))
            idx = on_device(rows, logits.device)
            token.index_copy_(0, idx, t)
            ok.index_copy_(0, idx, o)
            whole += [i for i, d in zip(rows, done.tolist()) if not d]
    if whole:  # way 3
        t, o = _race(_filter_sorted(take_rows(x, whole), [params[i] for i in whole]), take_rows(keys, whole), V)
        idx = on_device(whole, logits.device)
        token.index_copy_(0, idx, t)
        ok.index_copy_(0, idx, o)
    return token, ok
