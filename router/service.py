"""The one request path behind every front (gRPC, HTTP): validate, run, detokenize, account.

Fronts turn bytes into a pb.GenerateRequest and map `Refused` to their own status (a gRPC code, an
HTTP status); nothing else differs between them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from collections.abc import AsyncIterator
from typing import Any

import grpc

from engine.types import FinishReason, TokenLogprob
from protos.pdserve.v1 import generation_pb2 as pb
from router.config import LimitsConfig
from router.detokenizer import IncrementalDetokenizer, StopMatcher
from router.dispatcher import AlreadyExists, DeadlineExceeded, Dispatcher, ResourceExhausted, TokenChunk, WorkerFailure
from router.errors import InvalidArgument
from router.metrics import RouterMetrics
from router.validation import ValidRequest, validate

log = logging.getLogger(__name__)


class Refused(Exception):
    """A request ends with this status; `code` is the gRPC code (fronts map it to theirs)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


class GenerationService:
    def __init__(self, dispatcher: Dispatcher, tokenizer: Any, limits: LimitsConfig, max_model_len: int,
                 adapters: tuple[str, ...] = ()) -> None:
        """adapters: the LoRA adapters the workers serve (model.lora_adapters), which requests may name."""
        self.dispatcher, self.tokenizer, self.limits, self.max_model_len = dispatcher, tokenizer, limits, max_model_len
        self.adapters = adapters
        self.metrics = RouterMetrics()
        self.draining = False  # set by RouterServer.stop(): new requests are refused

    def admit(self, request: pb.GenerateRequest) -> ValidRequest:
        """Refused(UNAVAILABLE) while draining, Refused(INVALID_ARGUMENT, naming the field) if bad."""
        if self.draining:
            raise self.refuse(grpc.StatusCode.UNAVAILABLE,
                              "server is shutting down; retry on another replica (or after its restart)")
        try:
            return validate(request, self.tokenizer, self.limits, self.max_model_len, self.adapters)
        except InvalidArgument as e:
            raise self.refuse(grpc.StatusCode.INVALID_ARGUMENT, str(e), e.field) from None

    def refuse(self, code: grpc.StatusCode, message: str, field: str | None = None) -> Refused:
        self.metrics.errors.labels(code.name).inc()
        return Refused(code, message, field)

    async def status(self) -> pb.StatusResponse:
        resp = pb.StatusResponse()
        for s in await self.dispatcher.stats():
            resp.workers.add(
                role=s.role, id=s.id, node=s.node, running=s.running, waiting=s.waiting,
                kv_blocks_used=s.kv_blocks_used, kv_blocks_total=s.kv_blocks_total,
                prompt_tokens_computed=s.prompt_tokens_computed, tokens_generated=s.tokens_generated,
                state=s.state, restarts=s.restarts, preemptions=s.extra.get("preemptions", 0),
                recomputed_tokens=s.extra.get("recomputed_tokens", 0),
                kv_blocks_cached=s.extra.get("prefix_cached_blocks", 0),
                prefix_hit_tokens=s.extra.get("prefix_hit_tokens", 0),
                requests_prefilled=s.extra.get("requests_prefilled", 0),
            )
        return resp

    async def stream(self, req: ValidRequest) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Deltas of one request; the last carries finish_reason, usage and timings. Raises Refused.
        Closing the iterator early (client gone) cancels the request on the workers."""
        detok = IncrementalDetokenizer(self.tokenizer, req.skip_special_tokens)
        stops = StopMatcher(req.stop, req.include_stop_str)
        n_out = 0
        last_at: float | None = None
        try:
            async with aclosing(self.dispatcher.run(req)) as chunks:
                async for chunk in chunks:
                    ids = list(chunk.token_ids)
                    finish = chunk.finish_reason
                    if finish is FinishReason.STOP and ids and ids[-1] in req.sampling.stop_token_ids:
                        stop_reason = str(ids[-1])
                    else:
                        stop_reason = ""
                    # the EOS or stop token id that ended it has no text (as vLLM), unless asked for; a
                    # token that completed a structured output's grammar is part of the answer
                    ended_by = (finish is FinishReason.STOP and bool(ids) and (ids[-1] in req.sampling.stop_token_ids or (
                        not req.sampling.ignore_eos and ids[-1] in self.dispatcher.eos_token_ids)))
                    shown = ids[:-1] if ended_by and not req.include_stop_str else ids
                    quiet = max(0, min(len(shown), req.sampling.min_tokens - n_out))  # tokens within min_tokens
                    text, taken = _text_of(detok, stops, shown, quiet)
                    lps_in = chunk.logprobs or ()
                    if stops.matched is not None:  # ends here, whatever the workers are doing
                        finish, stop_reason = FinishReason.STOP, stops.matched
                        ids, lps_in = ids[:taken], lps_in[:taken]  # not the tokens after the one that completed it
                    n_out += len(ids)
                    now = time.monotonic()
                    if ids and last_at is not None:
                        gap = (now - last_at) / len(ids)
                        for _ in ids:
                            self.metrics.itl.observe(gap)
                    if ids:
                        last_at = now
                    lps = [_logprob_pb(lp) for lp in lps_in]
                    plps = [_logprob_pb(lp) for lp in chunk.prompt_logprobs or ()]  # the first chunk's
                    if finish is None:
                        if ids:
                            yield pb.GenerateStreamResponse(
                                request_id=req.request_id, text=text, token_ids=ids, logprobs=lps, prompt_logprobs=plps
                            )
                        continue
                    if stops.matched is None:
                        text += stops.add(detok.flush(), armed=n_out > req.sampling.min_tokens)
                        if stops.matched is not None:
                            finish, stop_reason = FinishReason.STOP, stops.matched
                    text += stops.flush()
                    last = self._last(req, text, ids, finish, stop_reason, n_out, chunk)
                    self.metrics.observe_finish(finish.value, chunk.timings, n_out, len(req.prompt_ids))
                    last.logprobs.extend(lps)
                    last.prompt_logprobs.extend(plps)
                    yield last
                    return  # leaving the generator early cancels the request on the workers
        except ResourceExhausted as e:
            raise self.refuse(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except DeadlineExceeded as e:
            raise self.refuse(grpc.StatusCode.DEADLINE_EXCEEDED, str(e)) from None
        except WorkerFailure as e:
            log.error("request %s failed: %s", req.request_id, e)
            raise self.refuse(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except AlreadyExists as e:
            raise self.refuse(grpc.StatusCode.ALREADY_EXISTS, str(e)) from None
        except InvalidArgument as e:  # a worker refused the request itself (its grammar does not compile there)
            raise self.refuse(grpc.StatusCode.INVALID_ARGUMENT, str(e), e.field) from None
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.errors.labels("CANCELLED").inc()
            raise
        except Exception as e:  # noqa: BLE001 — a bug must read as INTERNAL with a message, never UNKNOWN
            log.exception("request %s hit an internal error", req.request_id)
            raise self.refuse(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}") from None

    def _last(
        self, req: ValidRequest, text: str, ids: list[int], finish: FinishReason, stop_reason: str, n_out: int,
        chunk: TokenChunk,
    ) -> pb.GenerateStreamResponse:
        t = chunk.timings
        return pb.GenerateStreamResponse(
            request_id=req.request_id, text=text, token_ids=ids, finish_reason=finish.value, stop_reason=stop_reason,
            usage=pb.Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=n_out,
                           cached_tokens=int(t.get("cached_tokens", 0))),
            timings=pb.Timings(
                queue_ms=t.get("queue_ms", 0.0), prefill_ms=t.get("prefill_ms", 0.0),
                kv_transfer_ms=t.get("kv_transfer_ms", 0.0), kv_transfer_bytes=int(t.get("kv_transfer_bytes", 0)),
                ttft_ms=t.get("ttft_ms", 0.0), decode_ms=t.get("decode_ms", 0.0), total_ms=t.get("total_ms", 0.0),
                migrations=int(t.get("migrations", 0)), local_prefill=bool(t.get("local_prefill", 0)),
            ),
        )


def _text_of(detok: IncrementalDetokenizer, stops: StopMatcher, shown: list[int], quiet: int) -> tuple[str, int]:
    """The text `shown` releases (its first `quiet` tokens within min_tokens, where no stop string
    starts) and how many of its tokens it took: all of them, or those through the one that completed a
    stop string. A message may carry several tokens (a speculative run, events merged while the router
    was busy); with stop strings set they are read one at a time to find that token."""
    text = stops.add(detok.add(shown[:quiet]), armed=False) if quiet else ""
    if not stops.stops or len(shown) - quiet <= 1:
        return text + (stops.add(detok.add(shown[quiet:])) if quiet < len(shown) else ""), len(shown)
    for k in range(quiet, len(shown)):
        text += stops.add(detok.add(shown[k:k + 1]))
        if stops.matched is not None:
            return text, k + 1
    return text, len(shown)


def _logprob_pb(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob,
        top_logprobs=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top], rank=lp.rank,
    )
