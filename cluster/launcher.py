"""Start (or join) Ray, place the prefill and decode actors, wire the KV transport between them.

Start-up order: Ray → actors (all load the model in parallel) → transport world (ranks: prefill
0..P-1, decode P..P+D-1; rendezvous on prefill 0's node) → prefill workers learn their decode
peers → the router. Stop: actors killed, Ray shut down if this process started it.
mode: aggregated starts only the `aggregated:` workers (no transport); the router uses each one as
its own prefill and decode worker.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import ray

from cluster.config import PDServeConfig
from decode_worker.aggregated import AggregatedWorker
from decode_worker.worker import DecodeWorker
from engine.model_loader import eos_token_ids, load_tokenizer, resolve_path
from engine.transport import free_port
from engine.types import KVArrival
from prefill_worker.worker import PrefillWorker
from router.dispatcher import DecodeWorkerRef, Dispatcher
from router.server import GenerationService, RouterServer

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    pass


@dataclass
class RayDecodePeer:
    """What a prefill worker holds to tell a decode worker that KV is on the way (fire and forget)."""

    handle: Any

    def kv_incoming(self, arrival: KVArrival) -> None:
        self.handle.kv_incoming.remote(arrival)


def _node_info(worker: Any) -> tuple[str, str]:  # runs inside the actor via __ray_call__
    ctx = ray.get_runtime_context()
    worker.node = ctx.get_node_id()[:12]
    return ray.util.get_node_ip_address(), worker.node


def _pick_port(worker: Any) -> int:
    return free_port()


class Cluster:
    def __init__(self, cfg: PDServeConfig) -> None:
        self.cfg = cfg
        self.prefills: list[Any] = []
        self.decodes: list[Any] = []
        self.nodes: dict[str, str] = {}  # actor name → node id
        self._started_ray = False

    # -- start -----------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        t0 = time.monotonic()
        resolve_path(cfg.model)  # converts the default model once, here, before N workers race for it
        self._connect()
        self._check_resources()
        if cfg.mode == "aggregated":
            self._start_aggregated()
            log.info("cluster up in %.1fs: %d aggregated workers", time.monotonic() - t0, len(self.decodes))
            return
        name = cfg.cluster.name
        prefill_cls = ray.remote(PrefillWorker)
        decode_cls = ray.remote(DecodeWorker)
        for i in range(cfg.prefill.replicas):
            self.prefills.append(
                prefill_cls.options(name=f"{name}-prefill-{i}", **self._options(cfg.prefill)).remote(
                    f"prefill-{i}", cfg.model, cfg.prefill, cfg.transport
                )
            )
        for i in range(cfg.decode.replicas):
            self.decodes.append(
                decode_cls.options(name=f"{name}-decode-{i}", **self._options(cfg.decode)).remote(
                    f"decode-{i}", cfg.model, cfg.kv_cache, cfg.decode, cfg.transport
                )
            )
        workers = self.prefills + self.decodes
        self._get([w.ready.remote() for w in workers], "workers to load the model")
        infos = self._get([w.__ray_call__.remote(_node_info) for w in workers], "node info")
        ids = [f"prefill-{i}" for i in range(len(self.prefills))] + [f"decode-{i}" for i in range(len(self.decodes))]
        self.nodes = {wid: node for wid, (_, node) in zip(ids, infos)}
        master_ip = infos[0][0]
        port = self._get(workers[0].__ray_call__.remote(_pick_port), "a free port")
        world = len(workers)
        self._get(
            [w.init_transport.remote(rank, world, master_ip, port) for rank, w in enumerate(workers)],
            f"the {cfg.transport.resolve(cfg.model.device)} transport world of {world} workers",
        )
        P = len(self.prefills)
        peers = {P + i: RayDecodePeer(d) for i, d in enumerate(self.decodes)}
        self._get([p.set_peers.remote(peers) for p in self.prefills], "prefill peers")
        log.info(
            "cluster up in %.1fs: %d prefill + %d decode workers on %d node(s)",
            time.monotonic() - t0, P, len(self.decodes), len(set(self.nodes.values())),
        )

    def _start_aggregated(self) -> None:
        cfg = self.cfg
        cls = ray.remote(AggregatedWorker)
        for i in range(cfg.aggregated.replicas):
            self.decodes.append(
                cls.options(name=f"{cfg.cluster.name}-aggregated-{i}", **self._options(cfg.aggregated)).remote(
                    f"aggregated-{i}", cfg.model, cfg.kv_cache, cfg.aggregated
                )
            )
        self._get([w.ready.remote() for w in self.decodes], "workers to load the model")
        infos = self._get([w.__ray_call__.remote(_node_info) for w in self.decodes], "node info")
        self.nodes = {f"aggregated-{i}": node for i, (_, node) in enumerate(infos)}
        self._get([w.start.remote() for w in self.decodes], "workers to start")

    def _connect(self) -> None:
        c = self.cfg.cluster
        address = c.address or os.environ.get("RAY_ADDRESS")
        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if address:
            log.info("joining Ray cluster at %s", address)
            ray.init(address=address, namespace=c.namespace, log_to_driver=True)
        else:
            log.info("starting a local Ray instance")
            ray.init(namespace=c.namespace, num_cpus=c.num_cpus, include_dashboard=False, log_to_driver=True)
            self._started_ray = True

    def _check_resources(self) -> None:
        total = ray.cluster_resources()
        need: dict[str, float] = {}
        for role in self.cfg.roles:
            p = getattr(self.cfg, role)
            for key, per in (("CPU", p.num_cpus), ("GPU", p.num_gpus), *p.resources.items()):
                need[key] = need.get(key, 0.0) + per * p.replicas
        for key, amount in need.items():
            if amount > total.get(key, 0.0) + 1e-9:
                roles = " + ".join(self.cfg.roles)
                raise StartupError(
                    f"the Ray cluster has {total.get(key, 0.0):g} {key} but {roles} ask for {amount:g} "
                    f"(replicas x num_cpus/num_gpus/resources); lower them or add nodes"
                )

    @staticmethod
    def _options(p: Any) -> dict[str, Any]:
        return {
            "num_cpus": p.num_cpus,
            "num_gpus": p.num_gpus,
            "resources": dict(p.resources),
            "max_concurrency": 1024,  # prefill() blocks per request; reserve/poll/stats run alongside
            "max_restarts": 0,
        }

    def _get(self, refs: Any, what: str) -> Any:
        try:
            return ray.get(refs, timeout=self.cfg.cluster.startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.stop()
            raise StartupError(
                f"timed out after {self.cfg.cluster.startup_timeout_s:.0f}s waiting for {what} "
                "(cluster.startup_timeout_s); are the requested resources free?"
            ) from None
        except ray.exceptions.RayError as e:
            self.stop()
            raise StartupError(f"failed while waiting for {what}: {e}") from None

    # -- the router --------------------------------------------------------------------------------
    def make_router(self) -> RouterServer:
        cfg = self.cfg
        tok = load_tokenizer(cfg.model)
        eos = eos_token_ids(cfg.model, tok)
        if cfg.mode == "aggregated":  # each worker prefills what it decodes
            dispatcher = Dispatcher(
                list(self.decodes), [DecodeWorkerRef(i, d) for i, d in enumerate(self.decodes)], eos, cfg.limits,
                colocated=True,
            )
        else:
            P = len(self.prefills)
            decodes = [DecodeWorkerRef(P + i, d) for i, d in enumerate(self.decodes)]
            dispatcher = Dispatcher(self.prefills, decodes, eos, cfg.limits)
        return RouterServer(GenerationService(dispatcher, tok, cfg.limits, cfg.model.max_model_len), cfg.server)

    # -- stop --------------------------------------------------------------------------------------
    def stop(self) -> None:
        for w in self.prefills + self.decodes:
            try:
                ray.kill(w, no_restart=True)
            except Exception as e:  # noqa: BLE001
                log.debug("kill failed: %s", e)
        self.prefills, self.decodes = [], []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False


