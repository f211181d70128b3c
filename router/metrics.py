"""Prometheus metrics of the router: request latencies, token counts, errors, worker load.

Names follow Prometheus conventions (base units, `_total` counters, `_seconds`/`_bytes` suffixes).
Each router owns its registry (two routers in one process do not collide). Worker gauges are
refreshed from the workers' stats by the router's refresh loop (a pull from the actors).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from engine.types import WorkerStats

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
_BYTES = tuple(float(2**k) for k in range(10, 31, 2))


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("pdserve_ttft_seconds", "Time to first token (router accept → first token)",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("pdserve_itl_seconds", "Inter-token latency as the router sees tokens arrive",
                             buckets=_FAST, registry=r)
        self.tpot = Histogram("pdserve_tpot_seconds", "Time per output token after the first, per request",
                              buckets=_FAST, registry=r)
        self.e2e = Histogram("pdserve_e2e_seconds", "Request latency, accept → last token",
                             buckets=_LATENCY, registry=r)
        self.queue = Histogram("pdserve_queue_seconds", "Prefill queue time", buckets=_LATENCY, registry=r)
        self.prefill = Histogram("pdserve_prefill_seconds", "Prefill forward time (all chunks)",
                                 buckets=_LATENCY, registry=r)
        self.kv_transfer = Histogram("pdserve_kv_transfer_seconds", "KV handoff prefill → decode",
                                     buckets=_FAST, registry=r)
        self.kv_bytes = Histogram("pdserve_kv_transfer_bytes", "KV handoff size", buckets=_BYTES, registry=r)
        self.requests = Counter("pdserve_requests_total", "Finished requests", ["finish_reason"], registry=r)
        self.errors = Counter("pdserve_errors_total", "Requests that ended with a gRPC error", ["code"], registry=r)
        self.prompt_tokens = Counter("pdserve_prompt_tokens_total", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("pdserve_generation_tokens_total", "Tokens generated", registry=r)
        self.migrations = Counter("pdserve_request_migrations_total", "Requests moved to another decode worker "
                                  "mid-stream (theirs was lost)", registry=r)
        self.local_prefills = Counter("pdserve_local_prefills_total", "Prompts computed by the decode worker that "
                                      "reserved for them (a short uncached rest: decode.local_prefill_max_tokens; "
                                      "every prefill worker backed up: decode.local_prefill_queue_tokens; or no "
                                      "prefill worker alive): no prefill worker, no KV transfer", registry=r)
        self._seen = {self.migrations: 0, self.local_prefills: 0}
        self.in_flight = Gauge("pdserve_requests_in_flight", "Requests inside pdserve now", registry=r)
        self.queued = Gauge("pdserve_requests_queued", "Requests waiting for KV room", registry=r)
        labels = ["role", "worker"]
        self.w_running = Gauge("pdserve_worker_running_requests", "Requests running on a worker", labels, registry=r)
        self.w_waiting = Gauge("pdserve_worker_waiting_requests", "Requests waiting on a worker", labels, registry=r)
        self.w_kv_used = Gauge("pdserve_worker_kv_blocks_used", "KV blocks in use", labels, registry=r)
        self.w_kv_free = Gauge("pdserve_worker_kv_blocks_free", "KV blocks free (cached ones included)", labels, registry=r)
        self.w_kv_cached = Gauge("pdserve_worker_kv_blocks_cached", "Free KV blocks that keep earlier requests' KV "
                                 "for reuse (prefix cache; evicted when their room is needed)", labels, registry=r)
        self.w_prompt = Gauge("pdserve_worker_prompt_tokens_computed", "Prompt tokens run through the model",
                              labels, registry=r)
        self.w_generated = Gauge("pdserve_worker_tokens_generated", "Tokens sampled", labels, registry=r)
        self.w_prefix_hits = Gauge("pdserve_worker_prefix_cache_hit_tokens",
                                   "Prompt tokens whose KV a worker found in its prefix cache (not computed, "
                                   "not handed off, not recomputed)", labels, registry=r)
        self.w_prefix_queries = Gauge("pdserve_worker_prefix_cache_query_tokens",
                                      "Prompt tokens a worker looked up in its prefix cache", labels, registry=r)
        self.w_preemptions = Gauge("pdserve_worker_preemptions", "Requests whose KV a decode worker took back "
                                   "when its cache was full (recomputed when room returned)", labels, registry=r)
        self.w_recomputed = Gauge("pdserve_worker_recomputed_tokens", "Tokens whose KV a decode worker computed "
                                  "again (preempted requests, failed hand-offs)", labels, registry=r)
        self.w_drafts = Gauge("pdserve_worker_draft_tokens", "Draft tokens a decode worker's rows fed "
                              "(decode.speculative)", labels, registry=r)
        self.w_accepted = Gauge("pdserve_worker_accepted_tokens", "Of those, the ones the model agreed with: "
                                "tokens gained over one a step (acceptance rate = accepted / draft)", labels,
                                registry=r)
        self.w_steps = Gauge("pdserve_worker_steps", "Forwards a worker's step loop has run", labels, registry=r)
        self.w_loop = Gauge("pdserve_worker_loop_seconds", "Seconds a worker's step loop spent in each part of its "
                            "turns (idle, schedule, run: the forward, postprocess: sampling and events; on CUDA the "
                            "wait for the device is in postprocess); rate over rate(pdserve_worker_steps): per step",
                            [*labels, "part"], registry=r)
        self.w_up = Gauge("pdserve_worker_up", "1 while the worker serves, 0 while lost", labels, registry=r)
        self.w_restarts = Gauge("pdserve_worker_restarts", "Times the worker came back after being lost",
                                labels, registry=r)

    def serve(self, host: str, port: int) -> None:
        try:
            self._http = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise OSError(f"server.metrics_port: cannot listen on {host}:{port}: {e}") from None

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            server, thread = http
            server.shutdown()
            server.server_close()
            thread.join(5)

    def observe_finish(self, finish_reason: str, timings: dict[str, float], n_out: int, n_prompt: int) -> None:
        self.requests.labels(finish_reason).inc()
        self.prompt_tokens.inc(n_prompt)
        self.generation_tokens.inc(n_out)
        for hist, key in ((self.ttft, "ttft_ms"), (self.queue, "queue_ms"), (self.prefill, "prefill_ms"),
                          (self.kv_transfer, "kv_transfer_ms"), (self.e2e, "total_ms")):
            if key in timings:
                hist.observe(timings[key] / 1000)
        if "kv_transfer_bytes" in timings:
            self.kv_bytes.observe(timings["kv_transfer_bytes"])
        if n_out > 1 and "decode_ms" in timings:
            self.tpot.observe(timings["decode_ms"] / 1000 / (n_out - 1))

    def count(self, migrations: int, local_prefills: int) -> None:
        """The dispatcher's running counts → the counters."""
        for counter, total in ((self.migrations, migrations), (self.local_prefills, local_prefills)):
            if total > self._seen[counter]:
                counter.inc(total - self._seen[counter])
                self._seen[counter] = total

    def set_workers(self, stats: list[WorkerStats]) -> None:
        for s in stats:
            lab = (s.role, s.id)
            self.w_running.labels(*lab).set(s.running)
            self.w_waiting.labels(*lab).set(s.waiting)
            self.w_kv_used.labels(*lab).set(s.kv_blocks_used)
            self.w_kv_free.labels(*lab).set(s.kv_blocks_total - s.kv_blocks_used)
            self.w_prompt.labels(*lab).set(s.prompt_tokens_computed)
            self.w_generated.labels(*lab).set(s.tokens_generated)
            if "prefix_hit_tokens" in s.extra:
                self.w_prefix_hits.labels(*lab).set(s.extra["prefix_hit_tokens"])
                self.w_prefix_queries.labels(*lab).set(s.extra["prefix_query_tokens"])
                self.w_kv_cached.labels(*lab).set(s.extra["prefix_cached_blocks"])
            if "preemptions" in s.extra:
                self.w_preemptions.labels(*lab).set(s.extra["preemptions"])
                self.w_recomputed.labels(*lab).set(s.extra["recomputed_tokens"])
            if "draft_tokens" in s.extra:
                self.w_drafts.labels(*lab).set(s.extra["draft_tokens"])
                self.w_accepted.labels(*lab).set(s.extra["accepted_tokens"])
            if "loop_s" in s.extra:
                self.w_steps.labels(*lab).set(s.extra["steps"])
                for part, seconds in s.extra["loop_s"].items():
                    self.w_loop.labels(*lab, part).set(seconds)
            self.w_up.labels(*lab).set(1 if s.state == "serving" else 0)
            self.w_restarts.labels(*lab).set(s.restarts)
