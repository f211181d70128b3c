"""Small typed messages shared by router, prefill and decode workers (pickled over Ray)."""
from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.kv_handoff.types import KVDestination


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # EOS, a stop token id or a stop string
    CANCELLED = "cancelled"
    ERROR = "error"


GREEDY_BELOW = 1e-5  # a temperature under this is greedy (dividing logits by it overflows)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 (or < GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # over prompt + output (HF semantics)
    presence_penalty: float = 0.0  # over output (OpenAI semantics)
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; N: the chosen token's logprob + top-N alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit before sampling)
    min_tokens: int = 0  # before this many tokens, EOS and stop token ids are not drawn (stop strings not matched)
    prompt_logprobs: int | None = None  # None: off; N: each prompt token's logprob (but the first's) + top-N
    allowed_token_ids: tuple[int, ...] = ()  # vLLM's: () any token; else only these may be drawn
    grammar: str = ""  # structured output: the grammar the answer must match (engine/structured.py); "": free text
    grammar_after: str = ""  # the grammar holds only what follows this text's first appearance in the answer ("</think>")
    grammar_free_opener: str = ""  # with grammar_after: one token ("<think>") that, as the first, opens the free part; else held at once
    bad_words: tuple[tuple[int, ...], ...] = ()  # vLLM's: token sequences whose last token may not complete them
    thinking_budget: int | None = None  # at most this many thinking tokens, then think_end_id (engine/think_budget.py)
    think_end_id: int = -1  # with thinking_budget: the token of "</think>"
    think_open_id: int = -1  # ... and of "<think>" where the answer may open its thinking (-1: it starts inside)
    priority: int = 0  # lower is served sooner (vLLM semantics): KV room, prompt queue, decode batch, preemption last
    adapter: str = ""  # the LoRA adapter it runs with (model.lora_adapters; engine/lora.py): not a sampling
    # setting, but it goes with the request to every worker that computes it, as these do; "": the base model

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def reuses_prefix(self) -> bool:
        """Whether its prompt may start after a cached prefix: not when its prompt logprobs are asked
        for (every position is then computed, to be scored)."""
        return self.prompt_logprobs is None

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def banned_now(sampling: SamplingParams, num_generated: int, eos_token_ids: tuple[int, ...],
               output_ids: Sequence[int] = ()) -> tuple[int, ...]:
    """What a request's next token may not be: before its `min_tokens`, its stop token ids and
    (unless it ignores EOS) EOS; the last token of each bad word the output (`output_ids`) ends
    with the rest of (a one-token word: always)."""
    bad = tuple(w[-1] for w in sampling.bad_words
                if len(w) == 1 or tuple(output_ids[len(output_ids) - len(w) + 1:]) == w[:-1])
    if num_generated >= sampling.min_tokens:
        return bad
    return sampling.stop_token_ids + (() if sampling.ignore_eos else eos_token_ids) + bad


def finish_reason(token: int, num_generated: int, sampling: SamplingParams, eos_token_ids: tuple[int, ...]) -> FinishReason | None:
    """Whether the `num_generated`-th generated token (`token`) ends the request, and why."""
    if token in sampling.stop_token_ids:
        return FinishReason.STOP
    if not sampling.ignore_eos and token in eos_token_ids:
        return FinishReason.STOP
    if num_generated >= sampling.max_tokens:
        return FinishReason.LENGTH
    return None


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None  # prompt tokens: 1 + how many tokens the model found likelier


@dataclass(frozen=True)
class PrefillRequest:
    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: tuple[int, ...]
    dest: KVDestination | None  # the decode worker that reserved the KV and the blocks to write into (None: sent
    #                             later by the prefill worker's destine(), router/dispatcher.py step 2)
    cache_salt: str = ""  # prefix-cached KV is reused only between requests with the same salt


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    first_token: int
    finished: FinishReason | None  # set when the first token already ends the request
    queue_ms: float
    prefill_ms: float
    kv_bytes: int
    error: str | None = None
    first_logprob: TokenLogprob | None = None
    cached_tokens: int = 0  # prompt tokens whose KV the prefill worker found in its prefix cache
    handoff_failed: bool = False  # the error is the decode side's (refused, or no link): another may take it
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # asked for: prompt tokens 1.. (token 0 has none)
    refused_field: str = ""  # the error is the request's own (no worker would take it): the field at fault

    @classmethod
    def failed(cls, request_id: str, error: str, handoff: bool = False, refused_field: str = "") -> "PrefillResult":
        return cls(request_id, -1, FinishReason.ERROR, 0.0, 0.0, 0, error, handoff_failed=handoff,
                   refused_field=refused_field)


@dataclass(frozen=True)
class ReserveResult:
    ok: bool
    reason: str = ""
    dest: KVDestination | None = None  # set when ok: where the prompt's KV must be written
    refused_field: str = ""  # set when no room that frees would change the answer: the request's field at fault


@dataclass(slots=True)  # made a row per step: slots halve its construction
class DecodeEvent:
    """What a decode step produced for one request; the router streams it to the client."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    kv_transfer_ms: float | None = None
    kv_bytes: int | None = None
    logprobs: list[TokenLogprob] | None = None
    lost: bool = False  # made by the router: the request's decode worker was lost (it may move elsewhere)


@dataclass(frozen=True)
class WorkerStats:
    role: str  # "prefill" | "decode"
    id: str
    node: str
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prompt_tokens_computed: int
    tokens_generated: int
    extra: dict = field(default_factory=dict)
    state: str = "serving"  # the router's view: serving | lost (unreachable, restarting or dead)
    restarts: int = 0  # times the router saw it come back
