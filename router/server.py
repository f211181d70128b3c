"""The router process's servers: the gRPC front door (pdserve.v1.Generation + grpc.health.v1 +
reflection) and, beside it, the OpenAI-compatible HTTP front (router/http_api.py); one request
path behind both (router/service.py).

gRPC requests arrive as raw bytes so that bad UTF-8 is answered with INVALID_ARGUMENT naming the
field (protobuf's own parser would only say "bad UTF-8"). Errors are the service's `Refused` codes:
INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, UNAVAILABLE, ALREADY_EXISTS, INTERNAL.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.pdserve.v1 import generation_pb2 as pb
from router.config import ServerConfig
from router.service import GenerationService, Refused
from router.validation import InvalidArgument, ValidRequest, parse

__all__ = ["GenerationService", "GrpcFront", "RouterServer"]

log = logging.getLogger(__name__)
SERVICE = "pdserve.v1.Generation"


class GrpcFront:
    """pdserve.v1.Generation: raw request bytes in (so bad UTF-8 is INVALID_ARGUMENT naming the field)."""

    def __init__(self, svc: GenerationService) -> None:
        self.svc = svc

    async def Generate(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        req = await self._admit(raw, context)
        resp = pb.GenerateResponse(request_id=req.request_id)
        text: list[str] = []
        async for msg in self._stream(req, context):
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
        req = await self._admit(raw, context)
        async for msg in self._stream(req, context):
            yield msg

    async def Status(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        try:
            pb.StatusRequest.FromString(raw)
        except DecodeError as e:
            r = self.svc.refuse(grpc.StatusCode.INVALID_ARGUMENT, f"request: malformed StatusRequest: {e}")
            await context.abort(r.code, r.message)
        return await self.svc.status()

    async def _admit(self, raw: bytes, context: grpc.aio.ServicerContext) -> ValidRequest:
        try:
            return self.svc.admit(parse(raw))
        except InvalidArgument as e:  # undecodable bytes
            r = self.svc.refuse(grpc.StatusCode.INVALID_ARGUMENT, str(e), e.field)
        except Refused as e:
            r = e
        await context.abort(r.code, r.message)
        raise AssertionError("unreachable: abort raises")

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
        self.server.add_generic_rpc_handlers((_handlers(GrpcFront(self.svc)),))
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
