"""A pdserve cluster plus its router on a background event loop, for benchmarks and tests.

    with BackgroundServer(cfg) as srv:
        stub = srv.stub        # a pdserve.v1.Generation stub connected to it
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc

from cluster.config import PDServeConfig
from cluster.launcher import Cluster
from protos.pdserve.v1 import generation_pb2 as pb
from protos.pdserve.v1 import generation_pb2_grpc as pbg


class BackgroundServer:
    def __init__(self, cfg: PDServeConfig) -> None:
        self.cfg = cfg
        self.cluster = Cluster(cfg)
        self.cluster.start()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="router-loop", daemon=True)
        self._thread.start()
        self.server = self.cluster.make_router()
        port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(60)
        self.address = f"{'127.0.0.1' if cfg.server.host in ('0.0.0.0', '') else cfg.server.host}:{port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pbg.GenerationStub(self.channel)

    def generate(self, timeout: float = 60, **fields: Any) -> pb.GenerateResponse:
        return self.stub.Generate(pb.GenerateRequest(**fields), timeout=timeout)

    def status(self) -> list[pb.WorkerStatus]:
        return list(self.stub.Status(pb.StatusRequest(), timeout=30).workers)

    def all_idle(self) -> bool:
        """Every worker holds no request and every KV block is free (integrity-checked)."""
        import ray

        workers = self.cluster.prefills + self.cluster.decodes
        return all(ray.get([w.check_idle.remote() for w in workers], timeout=30))

    def stop(self) -> None:
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.cluster.stop()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
