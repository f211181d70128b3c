"""Token sampling for a whole batch at once, on the logits' device: one host sync per step (up to
three more when a row is not greedy: which rows fall back to a sort, engine/race.py); none at all in
sample_queued(), what a decode step left in flight samples with (engine/step_loop.py).

Order (every row, as tensors [B, V]): penalties on the raw logits → logit_bias → allowed_token_ids →
the grammar's mask (structured outputs, engine/structured.py) → banned tokens (min_tokens) → a
forced token (a spent thinking budget, engine/think_budget.py: only it may be drawn) → greedy
rows: argmax → the rest: temperature → top-k → top-p → min-p → draw (engine/race.py). Logprobs are the log-softmax of the raw logits. The draw is an exponential race
whose noise is a hash of (row key, token id), so a seeded request's row key (seed, position) gives
the same token whatever else is in the batch and whichever worker samples it; unseeded rows get a
fresh random key each step.
No row can fail the batch: NaN logits never win, a temperature under GREEDY_BELOW is greedy, the
logits are shifted by their max before the temperature divides them (no overflow for any
temperature), and a row whose distribution still comes out non-finite takes its best raw token.
Every host list reaches the device through a pinned copy (race.on_device), which does not wait for
the work queued before it.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.race import M32, draw, draw_sorted, on_device, take_rows
from engine.structured import Guide, guided, mask_logits
from engine.types import SamplingParams, TokenLogprob

Drawer = Callable[[torch.Tensor, list[SamplingParams], torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class History:
    """What penalties look at: the prompt and the tokens generated so far."""

    prompt: Sequence[int]
    output: Sequence[int]


def _row_keys(params: list[SamplingParams], positions: list[int]) -> list[int]:
    keys = []
    for p, pos in zip(params, positions):
        if p.seed is None:
            keys.append(random.getrandbits(32))
        else:  # (seed, position) → 32 bits; the hash mixes it further
            keys.append((p.seed * 1_000_003 + pos * 0x9E3779B1) & M32)
    return keys


def _penalize(logits: torch.Tensor, params: list[SamplingParams], histories: list[History | None]) -> torch.Tensor:
    """Repetition (HF: over prompt + output), presence and frequency (OpenAI: over output) penalties."""
    rows = [i for i, p in enumerate(params) if p.penalized and histories[i] is not None]
    if not rows:
        return logits
    dev, V = logits.device, logits.shape[1]
    hs = [histories[i] for i in rows]
    width = max(1, max(len(h.prompt) + len(h.output) for h in hs if h is not None))
    # every seen token id per row, padded with V (a dropped column): [R, width]
    seen_ids = torch.full((len(rows), width), V, dtype=torch.long)
    out_ids = torch.full((len(rows), width), V, dtype=torch.long)
    for r, h in enumerate(hs):
        assert h is not None
        both = list(h.prompt) + list(h.output)
        seen_ids[r, : len(both)] = torch.tensor(both, dtype=torch.long)
        out_ids[r, : len(h.output)] = torch.tensor(list(h.output), dtype=torch.long)
    seen_ids, out_ids = on_device(seen_ids.clamp(max=V), dev), on_device(out_ids.clamp(max=V), dev)
    seen = torch.zeros(len(rows), V + 1, dtype=torch.bool, device=dev).scatter_(1, seen_ids, True)[:, :V]
    counts = torch.zeros(len(rows), V + 1, device=dev).scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=torch.float))[:, :V]
    rp, pres, freq = (on_device([[float(getattr(params[i], f))] for i in rows], dev)  # [R, 1] each
                      for f in ("repetition_penalty", "presence_penalty", "frequency_penalty"))
    idx = on_device(rows, dev)
    x = logits.index_select(0, idx)  # [R, V]
    x = torch.where(seen, torch.where(x > 0, x / rp, x * rp), x)
    x = x - freq * counts - pres * (counts > 0).float()
    return logits.index_copy(0, idx, x)


def _bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """OpenAI's logit_bias: each listed token's logit plus its bias (-100 all but bans it, +100 all
    but forces it). An id past the logits' width (a tokenizer longer than the model's vocabulary)
    is skipped: it cannot be drawn anyway."""
    V = logits.shape[1]
    entries = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias if t < V]
    if not entries:
        return logits
    rows, toks, biases = zip(*entries)
    dev = logits.device
    return logits.index_put((on_device(list(rows), dev), on_device(list(toks), dev)),
                            on_device([float(b) for b in biases], dev).to(logits.dtype), accumulate=True)


def _allow(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """vLLM's allowed_token_ids: a row that lists them may take only those (the others get -inf)."""
    rows = [i for i, p in enumerate(params) if p.allowed_token_ids]
    V, dev = logits.shape[1], logits.device
    entries = [(r, t) for r, i in enumerate(rows) for t in params[i].allowed_token_ids if t < V]
    keep = torch.full((len(rows), V), float("-inf"), device=dev, dtype=logits.dtype)  # [R, V]
    if entries:
        r, t = zip(*entries)
        keep.index_put_((on_device(list(r), dev), on_device(list(t), dev)), torch.zeros((), device=dev, dtype=logits.dtype))
    idx = on_device(rows, dev)
    return logits.index_copy(0, idx, logits.index_select(0, idx) + keep)


def _ban(logits: torch.Tensor, banned: list[Sequence[int]]) -> torch.Tensor:
    """Each row's banned token ids (min_tokens: EOS and stop ids; bad words' last tokens) get -inf."""
    V = logits.shape[1]
    entries = [(i, t) for i, ids in enumerate(banned) for t in ids if t < V]
    if not entries:
        return logits
    rows, toks = zip(*entries)
    dev = logits.device
    return logits.index_put((on_device(list(rows), dev), on_device(list(toks), dev)),
                            torch.full((), float("-inf"), device=dev, dtype=logits.dtype))


def _force(logits: torch.Tensor, forced: Sequence[int | None]) -> torch.Tensor:
    """Rows with a forced token: every other token at -inf (the forced one keeps its logit)."""
    entries = [(i, t) for i, t in enumerate(forced) if t is not None and t < logits.shape[1]]
    if not entries:
        return logits
    rows, toks = zip(*entries)
    dev = logits.device
    idx, tok = on_device(list(rows), dev), on_device(list(toks), dev)
    keep = torch.full((len(rows), logits.shape[1]), float("-inf"), device=dev, dtype=logits.dtype)  # [R, V]
    keep.scatter_(1, tok[:, None], logits.index_select(0, idx).gather(1, tok[:, None]).nan_to_num(0.0, 0.0, 0.0))
    return logits.index_copy(0, idx, keep)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    positions: list[int],
    histories: list[History | None] | None = None,
    banned: list[Sequence[int]] | None = None,
    guides: Sequence[Guide | None] | None = None,
    forced: Sequence[int | None] | None = None,
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [B, V] (float32); positions[i] = the position the sampled token will occupy;
    histories[i]: row i's prompt and output (its penalties' input; None: unpenalized);
    banned[i]: token ids row i may not take (engine/types.py `banned_now`); guides[i]: row i's place
    in its grammar (structured output), having followed every token before this one; forced[i]: the
    token row i must take (engine/think_budget.py `forced_now`), or None."""
    return _sample(logits, params, positions, histories, banned, guides, forced, draw).collect()


def sample_queued(
    logits: torch.Tensor,
    params: list[SamplingParams],
    positions: list[int],
    histories: list[History | None] | None = None,
    banned: list[Sequence[int]] | None = None,
    guides: Sequence[Guide | None] | None = None,
    forced: Sequence[int | None] | None = None,
) -> Sampled:
    """sample() with every tensor op queued on the device and nothing waiting for it (the host
    computes a grammar's mask, then queues its copy), so a forward queued before it is not waited
    for: a decode step in flight (engine/step_loop.py) samples with this, and the caller may queue
    the next forward before collect(). Drawn rows draw by race.draw_sorted (the same tokens).
    logits [B, V] may be overwritten once this returns (a CUDA graph's output)."""
    return _sample(logits, params, positions, histories, banned, guides, forced, draw_sorted).staged()


def _sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
            histories: list[History | None] | None, banned: list[Sequence[int]] | None,
            guides: Sequence[Guide | None] | None, forced: Sequence[int | None] | None, how: Drawer) -> Sampled:
    raw = logits.float().nan_to_num(nan=float("-inf"))  # a NaN never wins (argmax would pick it); a new tensor
    logits = raw
    if any(p.penalized for p in params) and histories is not None:
        logits = _penalize(logits, params, histories)
    if any(p.logit_bias for p in params):
        logits = _bias(logits, params)
    if any(p.allowed_token_ids for p in params):
        logits = _allow(logits, params)
    if guided(guides):
        assert guides is not None
        logits = mask_logits(logits, guides)
    if banned is not None and any(banned):
        logits = _ban(logits, banned)
    if forced is not None and any(t is not None for t in forced):
        logits = _force(logits, forced)
    tokens = logits.argmax(dim=-1)  # [B]: the greedy answer, and every row's fallback
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if drawn:
        tokens = _drawn(logits, tokens, params, positions, drawn, how)
    return Sampled.of(raw, tokens, [p.logprobs for p in params])


def _drawn(logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams], positions: list[int],
           drawn: list[int], how: Drawer) -> torch.Tensor:
    """tokens [B] with rows `drawn` drawn from logits [B, V] (`how`: race.draw or race.draw_sorted);
    a row whose distribution came out empty or non-finite keeps its token (the best raw one)."""
    idx = on_device(drawn, logits.device)
    sub = [params[i] for i in drawn]
    keys = on_device(_row_keys(sub, [positions[i] for i in drawn]), logits.device)
    choice, ok = how(take_rows(logits, drawn), sub, keys)  # [R]
    return tokens.index_copy(0, idx, torch.where(ok, choice, tokens.index_select(0, idx)))


def needs_history(sampling: SamplingParams) -> bool:
    """Whether a row's next token depends on the tokens before it beyond the model's logits: its
    penalties count them, its grammar follows them, its thinking budget counts them. A step in
    flight samples such rows only once the host has the tokens of the step before
    (engine/step_loop.py), as are rows with a bad word of several tokens (whether its last is
    banned depends on the tokens before); every other row —
    greedy or drawn, with a logit_bias, allowed_token_ids, one-token bad words or a pending
    min_tokens — is sampled as it is launched."""
    return (sampling.penalized or bool(sampling.grammar) or sampling.thinking_budget is not None
            or any(len(w) > 1 for w in sampling.bad_words))


@dataclass(frozen=True)
class Sampled:
    """A batch's draw on the device: tokens [B] and, for the rows that asked for logprobs, the
    chosen token's and the top alternatives' (all queued before the host reads any of them)."""

    tokens: torch.Tensor  # [B] int64, on the device (a step that follows feeds on it)
    want: list[int | None]  # per row: how many alternatives; None: no logprobs
    chosen: torch.Tensor | None = None  # [B] the chosen tokens' logprobs
    top: tuple[torch.Tensor, torch.Tensor] | None = None  # ([B, n], [B, n]) ids, logprobs
    host: tuple[torch.Tensor, ...] = ()  # staged(): pinned host copies of the tensors above, being made
    copied: Any = None  # staged(): the CUDA event recorded after those copies

    @staticmethod
    def of(raw: torch.Tensor, tokens: torch.Tensor, want: list[int | None]) -> Sampled:
        """raw [B, V]: the logits logprobs are taken from (the raw distribution)."""
        if all(n is None for n in want):
            return Sampled(tokens, want)
        lp = torch.log_softmax(raw, dim=-1)  # [B, V]
        n_top = max(n or 0 for n in want)
        top = torch.topk(lp, n_top) if n_top else None
        return Sampled(tokens, want, lp.gather(1, tokens[:, None])[:, 0],
                       (top.indices, top.values) if top is not None else None)

    def _tensors(self) -> list[torch.Tensor]:
        return [self.tokens, *([self.chosen] if self.chosen is not None else []), *(self.top or ())]

    def staged(self) -> Sampled:
        """On CUDA: the same, with copies to pinned host memory queued and an event after them, so
        that collect() waits for this draw only — reading a device tensor (tolist) would wait for
        everything queued on the stream, the next step's forward included."""
        if self.tokens.device.type != "cuda":
            return self
        host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                     for t in self._tensors())
        copied = torch.cuda.Event()
        copied.record()
        return dataclasses.replace(self, host=host, copied=copied)

    def collect(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """The host's copy (waits for the draw): tokens, and each row's logprob or None."""
        if self.copied is not None:
            self.copied.synchronize()
        src = [t.tolist() for t in (self.host or self._tensors())]
        toks = src[0]
        if self.chosen is None:
            return toks, [None] * len(toks)
        chosen_l = src[1]
        top_i, top_v = (src[2], src[3]) if self.top is not None else ([], [])
        lps: list[TokenLogprob | None] = []
        for i, n in enumerate(self.want):
            if n is None:
                lps.append(None)
            else:
                alts = tuple(zip(top_i[i][:n], top_v[i][:n])) if n else ()
                lps.append(TokenLogprob(toks[i], chosen_l[i], alts))
        return toks, lps
