"""Start (or join) Ray, place the prefill and decode actors, wire the KV hand-off between them.

Start-up order: Ray → actors (all load the model in parallel) → step loops → hand-off wiring: each
decode worker publishes its endpoint (shared cache handle, pair store), and every prefill-decode
pair gets its backend (engine/kv_handoff `choose_backend`: a direct write within a node, else a
per-pair NCCL/gloo communicator opened now, not on a request's first transfer) → the router.
Workers are named by stable ids (prefill-0, decode-1, ...). Stop: actors killed, Ray shut down if
this process started it. mode: aggregated starts only the `aggregated:` workers (no hand-off); the
router uses each one as its own prefill and decode worker.
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
from engine.kv_handoff import DecodeEndpoint, SocketPeer, WriteGrant, WriteIntent, WriteOutcome, choose_backend
from engine.model_loader import eos_token_ids, load_tokenizer, resolve_path
from prefill_worker.worker import PrefillWorker
from router.dispatcher import Dispatcher, WorkerRef
from router.prefix_affinity import PrefixAffinity
from router.server import GenerationService, RouterServer

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    pass


@dataclass
class RayDecodePeer:
    """A prefill worker's handle on a decode worker for the hand-off through Ray: each call awaits its
    answer. Behind a SocketPeer, it carries the calls the decode worker's control socket cannot."""

    handle: Any

    def begin_write(self, intent: WriteIntent, timeout_s: float) -> WriteGrant:
        return ray.get(self.handle.begin_write.remote(intent), timeout=timeout_s)

    def end_write(self, outcome: WriteOutcome, timeout_s: float) -> None:
        ray.get(self.handle.end_write.remote(outcome), timeout=timeout_s)


def _describe(worker: Any) -> str:  # runs inside the actor via __ray_call__
    lookup = getattr(worker, "lookup", None)  # decode and aggregated workers: decode.speculative
    drafts = (f"; drafts by prompt lookup: up to {lookup.num_tokens} a row (runs of {lookup.min_n}-{lookup.max_n} "
              "tokens)" if lookup is not None and lookup.num_tokens else "")
    return str(worker.runner.describe()) + drafts


def _node_info(worker: Any) -> tuple[str, str, str]:  # runs inside the actor via __ray_call__
    """(ip, node id, place): place is the node on CPU and node + GPU uuid on CUDA — the scope of a
    direct write (Ray shows each actor only its own GPUs, so a peer GPU is reached over NCCL)."""
    import torch

    ctx = ray.get_runtime_context()
    worker.node = ctx.get_node_id()[:12]
    gpu = str(torch.cuda.get_device_properties(0).uuid) if torch.cuda.is_available() else ""
    return ray.util.get_node_ip_address(), worker.node, f"{worker.node}/{gpu}"


class Cluster:
    def __init__(self, cfg: PDServeConfig) -> None:
        self.cfg = cfg
        self.prefills: list[Any] = []
        self.decodes: list[Any] = []
        self.workers: dict[str, Any] = {}  # stable worker id → actor handle
        self.boots: dict[str, str] = {}  # worker id → boot id of the process wired in
        self.hosts: dict[str, str] = {}  # worker id → node IP
        self.nodes: dict[str, str] = {}  # worker id → node id
        self.places: dict[str, str] = {}  # worker id → node (+ GPU): the scope of a direct write
        self.endpoints: dict[str, DecodeEndpoint] = {}  # decode worker id → its hand-off endpoint
        self._wirings = 0  # wire() calls so far: part of every pair's name, so no name is used twice
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
                    f"prefill-{i}", cfg.model, cfg.prefill, cfg.transport, cfg.kv_cache.block_size,
                    kv_dtype=cfg.kv_cache.dtype,
                )
            )
        for i in range(cfg.decode.replicas):
            self.decodes.append(
                decode_cls.options(name=f"{name}-decode-{i}", **self._options(cfg.decode)).remote(
                    f"decode-{i}", cfg.model, cfg.kv_cache, cfg.decode, cfg.transport
                )
            )
        self._register()
        self._get([w.start.remote() for w in self.workers.values()], "workers to start")
        self.endpoints = dict(zip(self.decode_ids, self._get(
            [d.endpoint.remote(self.hosts[did]) for did, d in zip(self.decode_ids, self.decodes)], "decode endpoints"
        )))
        backends = self._wire([(pid, did) for pid in self.prefill_ids for did in self.decode_ids], at_start=True)
        log.info(
            "cluster up in %.1fs: %d prefill + %d decode workers on %d node(s); hand-off: %s",
            time.monotonic() - t0, len(self.prefills), len(self.decodes), len(set(self.nodes.values())),
            ", ".join(sorted(set(backends))),
        )

    def _register(self) -> None:
        """Wait for every worker's model; note each one's boot id, node and place."""
        self.workers = dict(zip(self.prefill_ids + self.decode_ids, self.prefills + self.decodes))
        boots = self._get([w.ready.remote() for w in self.workers.values()], "workers to load the model")
        infos = self._get([w.__ray_call__.remote(_node_info) for w in self.workers.values()], "node info")
        for wid, boot, (ip, node, place) in zip(self.workers, boots, infos):
            self.boots[wid], self.hosts[wid], self.nodes[wid], self.places[wid] = boot, ip, node, place
        for wid, what in zip(self.workers, self._get([w.__ray_call__.remote(_describe) for w in self.workers.values()],
                                                     "model descriptions")):
            log.info("%s: %s", wid, what)  # the model as each worker computes it, and the paths it takes

    @property
    def prefill_ids(self) -> list[str]:
        return [f"prefill-{i}" for i in range(len(self.prefills))]

    @property
    def decode_ids(self) -> list[str]:
        prefix = "aggregated" if self.cfg.mode == "aggregated" else "decode"
        return [f"{prefix}-{i}" for i in range(len(self.decodes))]

    def _wire(self, pairs: list[tuple[str, str]], at_start: bool = False) -> list[str]:
        """Each (prefill, decode) pair: pick its backend, then call both sides at once (a two-sided
        pair opens its communicator here, both meeting on the decode's store under a name that is
        new for every wiring: both sides' boot ids and this wiring's number)."""
        cfg = self.cfg
        calls, backends = [], []
        self._wirings += 1
        for pid, did in pairs:
            p, d, ep = self.workers[pid], self.workers[did], self.endpoints[did]
            try:
                backend = choose_backend(
                    cfg.transport.backend, cfg.model.device, self.places[pid] == self.places[did], ep.cache is not None
                )
            except ValueError as e:
                if at_start:
                    self.stop()
                raise StartupError(f"{pid} → {did}: {e}") from None
            backends.append(backend.value)
            tag = f"{self.boots[pid]}.{self.boots[did]}.{self._wirings}"
            peer = RayDecodePeer(d) if ep.control is None else SocketPeer(ep.control, RayDecodePeer(d))
            calls += [d.accept.remote(pid, backend, tag=tag), p.connect.remote(ep, peer, backend, tag=tag)]
        self._get(calls, f"the hand-off links of {len(pairs)} worker pairs", stop_on_error=at_start)
        return backends

    def forget(self, wid: str, live: set[str]) -> bool:
        """Decode worker `wid` is gone: the `live` prefill workers drop their links to it now (its
        cache, which each one on its node maps, and its pair channels), whether or not it comes back.
        False when `wid` has no such links (a prefill or aggregated worker): nothing was dropped."""
        if self.cfg.mode == "aggregated" or wid not in self.decode_ids:
            return False
        calls = [self.workers[pid].disconnect.remote(wid) for pid in self.prefill_ids if pid in live]
        try:  # bounded: a prefill worker that does not answer is the supervisor's next finding
            ray.get(calls, timeout=10)
        except ray.exceptions.RayError as e:
            log.warning("dropping the links to %s: %s", wid, e)
        return True

    def rewire(self, wid: str, boot: str, live: set[str]) -> None:
        """Worker `wid` came back as a new process (boot id `boot`): start its loop and wire its pairs
        with the `live` workers again. Raises StartupError if that fails (the caller retries)."""
        h = self.workers[wid]
        self.forget(wid, live)  # before anything of the new process is wired
        ip, node, place = self._get(h.__ray_call__.remote(_node_info), f"{wid}'s node", stop_on_error=False)
        self.boots[wid], self.hosts[wid], self.nodes[wid], self.places[wid] = boot, ip, node, place
        self._get(h.start.remote(), f"{wid} to start", stop_on_error=False)
        if self.cfg.mode == "aggregated":
            return
        if wid in self.decode_ids:
            self.endpoints[wid] = self._get(h.endpoint.remote(ip), f"{wid}'s endpoint", stop_on_error=False)
        self.reconnect(wid, live)
        log.info("%s re-wired after a restart", wid)

    def reconnect(self, wid: str, live: set[str]) -> None:
        """Wire worker `wid`'s pairs with the `live` workers again: after a restart (rewire), or when a
        decode worker found lost, whose links were dropped (forget), answers again as the same process."""
        if self.cfg.mode == "aggregated":
            return
        if wid in self.decode_ids:
            pairs = [(pid, wid) for pid in self.prefill_ids if pid in live]
        else:
            pairs = [(wid, did) for did in self.decode_ids if did in live]
        self._wire(pairs)

    def _start_aggregated(self) -> None:
        cfg = self.cfg
        cls = ray.remote(AggregatedWorker)
        for i in range(cfg.aggregated.replicas):
            self.decodes.append(
                cls.options(name=f"{cfg.cluster.name}-aggregated-{i}", **self._options(cfg.aggregated)).remote(
                    f"aggregated-{i}", cfg.model, cfg.kv_cache, cfg.aggregated
                )
            )
        self._register()
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

    def _options(self, p: Any) -> dict[str, Any]:
        return {
            "num_cpus": p.num_cpus,
            "num_gpus": p.num_gpus,
            "resources": dict(p.resources),
            "max_concurrency": 1024,  # prefill() blocks per request; reserve/poll/stats run alongside
            "max_restarts": self.cfg.cluster.max_restarts,  # the supervisor re-wires a restarted worker
        }

    def _get(self, refs: Any, what: str, stop_on_error: bool = True) -> Any:
        try:
            return ray.get(refs, timeout=self.cfg.cluster.startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            if stop_on_error:
                self.stop()
            raise StartupError(
                f"timed out after {self.cfg.cluster.startup_timeout_s:.0f}s waiting for {what} "
                "(cluster.startup_timeout_s); are the requested resources free?"
            ) from None
        except ray.exceptions.RayError as e:
            if stop_on_error:
                self.stop()
            raise StartupError(f"failed while waiting for {what}: {e}") from None

    # -- the router --------------------------------------------------------------------------------
    def make_router(self) -> RouterServer:
        cfg = self.cfg
        tok = load_tokenizer(cfg.model)
        eos = eos_token_ids(cfg.model, tok)
        kept = PrefixAffinity(cfg.kv_cache.block_size) if cfg.kv_cache.prefix_cache else None  # decode side
        if cfg.mode == "aggregated":  # each worker prefills what it decodes
            workers = [WorkerRef(f"aggregated-{i}", d) for i, d in enumerate(self.decodes)]
            dispatcher = Dispatcher(workers, workers, eos, cfg.limits, colocated=True, decode_affinity=kept)
        else:
            prefills = [WorkerRef(f"prefill-{i}", p) for i, p in enumerate(self.prefills)]
            decodes = [WorkerRef(f"decode-{i}", d) for i, d in enumerate(self.decodes)]
            affinity = PrefixAffinity(cfg.kv_cache.block_size) if cfg.prefill.prefix_cache else None
            dispatcher = Dispatcher(prefills, decodes, eos, cfg.limits, affinity=affinity, decode_affinity=kept,
                                    local_prefill_tokens=cfg.decode.local_prefill_max_tokens,
                                    local_prefill_queue_tokens=cfg.decode.local_prefill_queue_tokens,
                                    overlap_reserve=cfg.prefill.overlap_reserve)
        from cluster.supervisor import Supervisor

        name = cfg.server.served_model_name or os.path.basename(cfg.model.path.rstrip("/"))
        svc = GenerationService(dispatcher, tok, cfg.limits, cfg.model.max_model_len, tuple(cfg.model.lora_adapters))
        server = RouterServer(svc, cfg.server, name)
        server.background.append(Supervisor(self, dispatcher).run)
        return server

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


