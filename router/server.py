"""The gRPC front door: pdserve.v1.Generation + grpc.health.v1 + server reflection.

Requests arrive as raw bytes so that bad UTF-8 is answered with INVALID_ARGUMENT naming the field
(protobuf's own parser would only say "bad UTF-8"). Errors map to gRPC codes:
  InvalidArgument → INVALID_ARGUMENT, ResourceExhausted → RESOURCE_EXHAUSTED,
  DeadlineExceeded → DEADLINE_EXCEEDED, WorkerFailure → UNAVAILABLE.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.types import FinishReason, TokenLogprob
from protos.pdserve.v1 import generation_pb2 as pb
from router.config import LimitsConfig, ServerConfig
from router.detokenizer import IncrementalDetokenizer, StopMatcher
from router.metrics import RouterMetrics
from router.dispatcher import AlreadyExists, DeadlineExceeded, Dispatcher, ResourceExhausted, TokenChunk, WorkerFailure
from router.validation import InvalidArgument, ValidRequest, parse, validate

log = logging.getLogger(__name__)
SERVICE = "pdserve.v1.Generation"


class GenerationService:
    def __init__(self, dispatcher: Dispatcher, tokenizer: Any, limits: LimitsConfig, max_model_len: int) -> None:
        self.dispatcher, self.tokenizer, self.limits, self.max_model_len = dispatcher, tokenizer, limits, max_model_len
        self.metrics = RouterMetrics()
        self.draining = False  # set by RouterServer.stop(): new requests are refused

    # -- RPCs ------------------------------------------------------------------------------------
    async def Generate(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        req = await self._validate(raw, context)
        resp = pb.GenerateResponse(request_id=req.request_id)
        text: list[str] = []
        async for msg in self._generate(req, context):
            text.append(msg.text)
            resp.token_ids.extend(msg.token_ids)
            resp.logprobs.extend(msg.logprobs)
            if msg.finish_reason:
                resp.finish_reason, resp.stop_reason = msg.finish_reason, msg.stop_reason
                resp.usage.CopyFrom(msg.usage)
                resp.timings.CopyFrom(msg.timings)
        resp.text = "".join(text)
        return resp

    async def GenerateStream(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        req = await self._validate(raw, context)
        async for msg in self._generate(req, context):
            yield msg

    async def Status(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        try:
            pb.StatusRequest.FromString(raw)
        except DecodeError as e:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"request: malformed StatusRequest: {e}")
        resp = pb.StatusResponse()
        for s in await self.dispatcher.stats():
            resp.workers.add(
                role=s.role, id=s.id, node=s.node, running=s.running, waiting=s.waiting,
                kv_blocks_used=s.kv_blocks_used, kv_blocks_total=s.kv_blocks_total,
                prompt_tokens_computed=s.prompt_tokens_computed, tokens_generated=s.tokens_generated,
                state=s.state, restarts=s.restarts,
            )
        return resp

    # -- the shared path ---------------------------------------------------------------------------
    async def _validate(self, raw: bytes, context: grpc.aio.ServicerContext) -> ValidRequest:
        if self.draining:
            await self._abort(context, grpc.StatusCode.UNAVAILABLE,
                              "server is shutting down; retry on another replica (or after its restart)")
        try:
            return validate(parse(raw), self.tokenizer, self.limits, self.max_model_len)
        except InvalidArgument as e:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise  # unreachable: abort raises

    async def _abort(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, msg: str) -> None:
        self.metrics.errors.labels(code.name).inc()
        await context.abort(code, msg)

    async def _generate(
        self, req: ValidRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(req.stop)
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
                    text = stops.add(detok.add(ids))
                    if stops.matched is not None:  # ends here, whatever the workers are doing
                        finish, stop_reason = FinishReason.STOP, stops.matched
                    n_out += len(ids)
                    now = time.monotonic()
                    if ids and last_at is not None:
                        gap = (now - last_at) / len(ids)
                        for _ in ids:
                            self.metrics.itl.observe(gap)
                    if ids:
                        last_at = now
                    lps = [_logprob_pb(lp) for lp in chunk.logprobs or ()]
                    if finish is None:
                        if ids:
                            yield pb.GenerateStreamResponse(
                                request_id=req.request_id, text=text, token_ids=ids, logprobs=lps
                            )
                        continue
                    if stops.matched is None:
                        text += stops.add(detok.flush())
                        if stops.matched is not None:
                            finish, stop_reason = FinishReason.STOP, stops.matched
                    text += stops.flush()
                    last = self._last(req, text, ids, finish, stop_reason, n_out, chunk)
                    self.metrics.observe_finish(finish.value, chunk.timings, n_out, len(req.prompt_ids))
                    last.logprobs.extend(lps)
                    yield last
                    return  # leaving the generator early cancels the request on the workers
        except ResourceExhausted as e:
            await self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except DeadlineExceeded as e:
            await self._abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        except WorkerFailure as e:
            log.error("request %s failed: %s", req.request_id, e)
            await self._abort(context, grpc.StatusCode.UNAVAILABLE, str(e))
        except AlreadyExists as e:
            await self._abort(context, grpc.StatusCode.ALREADY_EXISTS, str(e))
        except asyncio.CancelledError:
            self.metrics.errors.labels("CANCELLED").inc()
            raise
        except Exception as e:  # noqa: BLE001 — a bug must read as INTERNAL with a message, never UNKNOWN
            log.exception("request %s hit an internal error", req.request_id)
            await self._abort(context, grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")

    def _last(
        self, req: ValidRequest, text: str, ids: list[int], finish: FinishReason, stop_reason: str, n_out: int,
        chunk: TokenChunk,
    ) -> pb.GenerateStreamResponse:
        t = chunk.timings
        return pb.GenerateStreamResponse(
            request_id=req.request_id, text=text, token_ids=ids, finish_reason=finish.value, stop_reason=stop_reason,
            usage=pb.Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=n_out),
            timings=pb.Timings(
                queue_ms=t.get("queue_ms", 0.0), prefill_ms=t.get("prefill_ms", 0.0),
                kv_transfer_ms=t.get("kv_transfer_ms", 0.0), kv_transfer_bytes=int(t.get("kv_transfer_bytes", 0)),
                ttft_ms=t.get("ttft_ms", 0.0), decode_ms=t.get("decode_ms", 0.0), total_ms=t.get("total_ms", 0.0),
            ),
        )


def _logprob_pb(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob,
        top_logprobs=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def _handlers(svc: GenerationService) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Generate": grpc.unary_unary_rpc_method_handler(
                svc.Generate, request_deserializer=None, response_serializer=pb.GenerateResponse.SerializeToString
            ),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(
                svc.GenerateStream, request_deserializer=None,
                response_serializer=pb.GenerateStreamResponse.SerializeToString,
            ),
            "Status": grpc.unary_unary_rpc_method_handler(
                svc.Status, request_deserializer=None,
                response_serializer=pb.StatusResponse.SerializeToString,
            ),
        },
    )


class RouterServer:
    """Owns the grpc.aio server and the dispatcher's pollers; start() returns the bound port."""

    def __init__(self, svc: GenerationService, cfg: ServerConfig) -> None:
        self.svc, self.cfg = svc, cfg
        self.port = 0
        self.draining = False
        self.background: list[Callable[[], Awaitable[None]]] = []  # run while serving (the supervisor)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        """Bind and serve on the running event loop (grpc.aio servers belong to the loop that made them)."""
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers((_handlers(self.svc),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(f"{self.cfg.host}:{self.cfg.port}")
        if self.port == 0:
            raise OSError(f"server.port: cannot listen on {self.cfg.host}:{self.cfg.port}")
        self.svc.dispatcher.start()
        if self.cfg.metrics_port:
            self.svc.metrics.serve(self.cfg.host, self.cfg.metrics_port)
        self._refresh = asyncio.create_task(self._refresh_metrics())
        self._tasks = [asyncio.ensure_future(run()) for run in [*self.background, self._track_health]]
        await self.server.start()
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def _refresh_metrics(self, every_s: float = 2.0) -> None:
        """Pull worker stats into the gauges (and keep the router's own gauges current)."""
        m, d = self.svc.metrics, self.svc.dispatcher
        while True:
            m.in_flight.set(d.in_flight)
            m.queued.set(d.queued)
            try:
                m.set_workers(await d.stats())  # also finds workers that are gone
            except Exception as e:  # noqa: BLE001 — metrics must never take the router down
                log.warning("worker stats refresh failed: %s", e)
            await asyncio.sleep(every_s)

    async def _track_health(self, every_s: float = 0.2) -> None:
        """SERVING while a request can be served (a live decode worker and, disaggregated, a live
        prefill worker) and the server is not draining; else NOT_SERVING. Local state only: cheap."""
        last = None
        while True:
            ok = self.svc.dispatcher.serving and not self.draining
            if ok != last:
                status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in (SERVICE, ""):
                    await self.health.set(name, status)
                last = ok
            await asyncio.sleep(every_s)

    async def stop(self) -> None:
        """Drain: 1. NOT_SERVING, new requests UNAVAILABLE; 2. in-flight requests may finish within
        server.grace_period_s; 3. the rest end with UNAVAILABLE (their KV freed on the workers);
        4. the server and the pollers stop."""
        self.draining = self.svc.draining = True
        for name in (SERVICE, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        d = self.svc.dispatcher
        end = time.monotonic() + self.cfg.grace_period_s
        while d.in_flight and time.monotonic() < end:
            await asyncio.sleep(0.05)
        if d.in_flight:
            log.warning("ending %d requests still in flight after server.grace_period_s", d.in_flight)
            d.abort_all("server is shutting down (server.grace_period_s passed); retry")
            end = time.monotonic() + 5  # their cancels reach the workers
            while d.in_flight and time.monotonic() < end:
                await asyncio.sleep(0.05)
        self._refresh.cancel()
        for t in self._tasks:
            t.cancel()
        await self.server.stop(1.0)
        await d.close()
        self.svc.metrics.close()
