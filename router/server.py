"""The router process's servers: the gRPC front door (pdserve.v1.Generation + grpc.health.v1 +
reflection) and, beside it, the OpenAI-compatible HTTP front (router/http_api.py); one request
path behind both (router/service.py).

gRPC requests arrive as raw bytes so that bad UTF-8 is answered with INVALID_ARGUMENT naming the
field (protobuf's own parser would only say "bad UTF-8"). Errors are the service's `Refused` codes:
INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, UNAVAILABLE, ALREADY_EXISTS, INTERNAL.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from contextlib import aclosing
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
import uvicorn

from protos.pdserve.v1 import generation_pb2 as pb
from router.answer_split import ChatSplit, parsed_answer, parsed_delta, with_reasoning_tokens
from router.config import ServerConfig
from router.errors import InvalidArgument
from router.http_api import build_app
from router.reasoning import keep_markers, prompt_opens_thinking, reasoning_tokens, think_budget, think_first
from router.security import AuthInterceptor, TokenStore, grpc_credentials, uvicorn_ssl
from router.service import GenerationService, Refused
from router.tools import grpc_tool_mode
from router.validation import ValidRequest, parse

__all__ = ["GenerationService", "GrpcFront", "RouterServer"]

log = logging.getLogger(__name__)
SERVICE = "pdserve.v1.Generation"


class GrpcFront:
    """pdserve.v1.Generation: raw request bytes in (so bad UTF-8 is INVALID_ARGUMENT naming the field).
    A chat request's answer is also read into `parsed` (router/answer_split.py) where it has tools to
    call (`tool_choice`) or the server splits out thinking (`reasoning_parser`)."""

    def __init__(self, svc: GenerationService, tool_parser: str | None = None,
                 reasoning_parser: str | None = None) -> None:
        self.svc, self.tool_parser, self.reasoning_parser = svc, tool_parser, reasoning_parser

    async def Generate(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        req, split = await self._admit(raw, context)
        resp = pb.GenerateResponse(request_id=req.request_id)
        text: list[str] = []
        async for msg in self._stream(req, context):
            text.append(msg.text)
            resp.token_ids.extend(msg.token_ids)
            resp.logprobs.extend(msg.logprobs)
            resp.prompt_logprobs.extend(msg.prompt_logprobs)
            if msg.finish_reason:
                resp.finish_reason, resp.stop_reason = msg.finish_reason, msg.stop_reason
                resp.usage.CopyFrom(msg.usage)
                resp.timings.CopyFrom(msg.timings)
        resp.text = "".join(text)
        if split is not None:
            reasoning, parts, resp.finish_reason = split.feed(resp.text, resp.finish_reason, resp.token_ids)
            resp.parsed.CopyFrom(parsed_answer(reasoning, parts))
            with_reasoning_tokens(resp.usage, split)
        return resp

    async def GenerateStream(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        req, split = await self._admit(raw, context)
        async for msg in self._stream(req, context):
            if split is not None:
                reasoning, parts, msg.finish_reason = split.feed(msg.text, msg.finish_reason, msg.token_ids)
                msg.parsed.CopyFrom(parsed_delta(reasoning, parts))
                if msg.finish_reason:
                    with_reasoning_tokens(msg.usage, split)
            yield msg

    async def Status(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        try:
            pb.StatusRequest.FromString(raw)
        except DecodeError as e:
            r = self.svc.refuse(grpc.StatusCode.INVALID_ARGUMENT, f"request: malformed StatusRequest: {e}")
            await context.abort(r.code, r.message)
        return await self.svc.status()

    async def _admit(self, raw: bytes, context: grpc.aio.ServicerContext) -> tuple[ValidRequest, ChatSplit | None]:
        try:
            return self._chat(parse(raw))
        except InvalidArgument as e:  # undecodable bytes, a bad tool_choice
            r = self.svc.refuse(grpc.StatusCode.INVALID_ARGUMENT, str(e), e.field)
        except Refused as e:
            r = e
        await context.abort(r.code, r.message)
        raise AssertionError("unreachable: abort raises")

    def _chat(self, request: pb.GenerateRequest) -> tuple[ValidRequest, ChatSplit | None]:
        """The request admitted, and its answer's ChatSplit where it is read into `parsed`: its tool
        choice (a named function or "required" sets its grammar), its thinking (a grammar holds
        only what follows it: router/reasoning.think_first, as the HTTP front does)."""
        tools = grpc_tool_mode(request, self.tool_parser)
        keep_markers(request, self.reasoning_parser)
        try:
            req = self.svc.admit(request)
        except Refused as e:  # the tools' grammar is refused: name the tool's parameters
            if tools is not None and e.field and e.field.startswith("structured"):
                raise Refused(e.code, e.message.replace(e.field, tools.param, 1), tools.param) from None
            raise
        parser = self.reasoning_parser or "think"
        reasoning = bool(request.messages) and self.reasoning_parser is not None
        thinking = reasoning and parser == "think" and prompt_opens_thinking(req.prompt_ids, self.svc.tokenizer)
        if reasoning:
            req = think_first(req, thinking, self.svc.tokenizer, parser)
        req = think_budget(req, reasoning, thinking, self.svc.tokenizer, parser)
        harmony = reasoning and parser == "harmony"
        return req, (ChatSplit(tools, reasoning, thinking, count=self._reasoning_tokens, harmony=harmony)
                     if tools or reasoning else None)

    def _reasoning_tokens(self, ids: Sequence[int]) -> int:
        return reasoning_tokens(ids, self.svc.tokenizer, self.reasoning_parser or "think")

    async def _stream(
        self, req: ValidRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            async with aclosing(self.svc.stream(req)) as msgs:
                async for msg in msgs:
                    yield msg
        except Refused as e:
            await context.abort(e.code, e.message)


def _handlers(svc: GrpcFront) -> grpc.GenericRpcHandler:
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


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: `pdserve serve` drains on SIGTERM itself."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()


class RouterServer:
    """Owns the gRPC server, the HTTP server and the dispatcher's pollers; start() returns the gRPC port."""

    def __init__(self, svc: GenerationService, cfg: ServerConfig, model_name: str = "pdserve") -> None:
        self.svc, self.cfg, self.model_name = svc, cfg, model_name
        self.port = 0
        self.http_port: int | None = None
        self._http: _Uvicorn | None = None
        self._http_task: asyncio.Task[None] | None = None
        self.draining = False
        self.background: list[Callable[[], Awaitable[None]]] = []  # run while serving (the supervisor)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        """Bind and serve on the running event loop (grpc.aio servers belong to the loop that made them)."""
        cfg = self.cfg
        tokens = TokenStore(cfg.auth) if cfg.auth is not None else None
        interceptors = [AuthInterceptor(tokens, lambda: self.svc.metrics.errors.labels("UNAUTHENTICATED").inc())
                        ] if tokens is not None else []
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", cfg.max_body_bytes),
            ("grpc.max_concurrent_streams", cfg.max_streams_per_connection),
        ])
        front = GrpcFront(self.svc, cfg.tool_call_parser, cfg.reasoning_parser)
        self.server.add_generic_rpc_handlers((_handlers(front),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        where = f"{cfg.host}:{cfg.port}"
        self.port = (self.server.add_secure_port(where, grpc_credentials(cfg.tls)) if cfg.tls is not None
                     else self.server.add_insecure_port(where))
        if self.port == 0:
            raise OSError(f"server.port: cannot listen on {where}")
        if cfg.http_port is not None:
            await self._start_http(tokens)
        self.svc.dispatcher.start()
        if self.cfg.metrics_port:
            self.svc.metrics.serve(self.cfg.host, self.cfg.metrics_port)
        self._refresh = asyncio.create_task(self._refresh_metrics())
        self._tasks = [asyncio.ensure_future(run()) for run in [*self.background, self._track_health]]
        await self.server.start()
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def _start_http(self, tokens: TokenStore | None) -> None:
        cfg = self.cfg
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.host, cfg.http_port or 0))
        except OSError as e:
            sock.close()
            raise OSError(f"server.http_port: cannot listen on {cfg.host}:{cfg.http_port}: {e}") from None
        self.http_port = int(sock.getsockname()[1])
        app = build_app(self.svc, self.model_name, tokens, cfg.max_body_bytes, cfg.tool_call_parser,
                        cfg.reasoning_parser)
        self._http = _Uvicorn(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1,
                                             **uvicorn_ssl(cfg.tls)))
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():  # failed to start: say why
                self._http_task.result()
                raise OSError("server.http_port: the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def _refresh_metrics(self, every_s: float = 2.0) -> None:
        """Pull worker stats into the gauges (and keep the router's own gauges current)."""
        m, d = self.svc.metrics, self.svc.dispatcher
        while True:
            m.in_flight.set(d.in_flight)
            m.queued.set(d.queued)
            m.count(d.migrations, d.local_prefills)
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
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            await asyncio.wait({self._http_task}, timeout=5)
        await self.server.stop(1.0)
        await d.close()
        self.svc.metrics.close()
