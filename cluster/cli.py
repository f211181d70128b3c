"""The `pdserve` command: serve, generate, status, prepare."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import grpc

from cluster import client
from protos.pdserve.v1 import generation_pb2 as pb
from protos.pdserve.v1 import generation_pb2_grpc as pbg

DEFAULT_ADDRESS = "127.0.0.1:50051"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving on Ray.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="start the workers and the gRPC router; Ctrl-C stops everything")
    s.add_argument("--config", default=None, help="YAML file (default: built-in defaults = deploy/local.yaml)")
    s.add_argument("--port", type=int, help="gRPC port (overrides server.port)")
    s.add_argument("--host", help="gRPC listen address (overrides server.host)")
    s.add_argument("--metrics-port", type=int, help="Prometheus port (overrides server.metrics_port)")
    s.add_argument("--http-port", type=int, help="OpenAI-compatible HTTP port (overrides server.http_port)")
    s.add_argument("--address", help="Ray address to join (overrides cluster.address), e.g. auto")

    g = sub.add_parser("generate", help="send one request to a running pdserve")
    g.add_argument("prompt")
    g.add_argument("--address", default=DEFAULT_ADDRESS, help="router HOST:PORT")
    g.add_argument("--ca-file", help="PEM CA that signed the server's certificate: speak TLS")
    g.add_argument("--raw", action="store_true", help="send a raw prompt (default: a chat user message)")
    g.add_argument("--system", help="system message (chat mode)")
    g.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--thinking-budget", type=int, help="at most N tokens of thinking, then </think> (a chat request "
                                                       "on a server with server.reasoning_parser)")
    g.add_argument("--timeout", type=float, default=300.0, help="client deadline in seconds")
    g.add_argument("--json", action="store_true", help="print the whole response as JSON")
    held = g.add_mutually_exclusive_group()  # structured outputs: what the answer must match
    held.add_argument("--json-schema", help="the answer is JSON this schema accepts (JSON text, or @FILE)")
    held.add_argument("--regex", help="the whole answer matches this regular expression")
    held.add_argument("--choice", action="append", help="the answer is one of these strings (repeatable)")

    st = sub.add_parser("status", help="per-worker load of a running pdserve")
    st.add_argument("--address", default=DEFAULT_ADDRESS)
    st.add_argument("--ca-file", help="PEM CA that signed the server's certificate: speak TLS")
    st.add_argument("--json", action="store_true")

    from cluster.bench.command import add_parser as add_bench

    add_bench(sub)

    pr = sub.add_parser("prepare", help="convert the embedded default model once (make install runs it)")
    pr.add_argument("--config", default=None)

    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.cmd == "bench" else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return {"serve": _serve, "generate": _generate, "status": _status, "prepare": _prepare,
                "bench": _bench}[args.cmd](args)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


# -- serve ------------------------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    from cluster.config import ConfigError, load_config
    from cluster.launcher import Cluster, StartupError

    try:
        cfg = load_config(
            args.config,
            {"server": {"port": args.port, "host": args.host, "metrics_port": args.metrics_port,
                        "http_port": args.http_port},
             "cluster": {"address": args.address}},
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cluster = Cluster(cfg)
    try:
        cluster.start()
    except (StartupError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        asyncio.run(_serve_async(cluster))
    finally:
        cluster.stop()
    return 0


async def _serve_async(cluster: Any) -> None:
    server = cluster.make_router()
    port = await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    shape = (f"{len(cluster.decodes)} aggregated" if cluster.cfg.mode == "aggregated"
             else f"{len(cluster.prefills)} prefill, {len(cluster.decodes)} decode")
    http = f", OpenAI HTTP on {server.cfg.host}:{server.http_port}/v1" if server.http_port else ""
    print(f"pdserve: serving pdserve.v1.Generation on {server.cfg.host}:{port}{http} ({shape}); Ctrl-C stops",
          flush=True)
    await stop.wait()
    print("pdserve: shutting down", flush=True)
    await server.stop()


# -- generate ---------------------------------------------------------------------------------------
def build_request(args: argparse.Namespace) -> pb.GenerateRequest:
    req = pb.GenerateRequest(stop=args.stop, ignore_eos=args.ignore_eos)
    if args.raw:
        req.prompt = args.prompt
    else:
        if args.system:
            req.messages.add(role="system", content=args.system)
        req.messages.add(role="user", content=args.prompt)
    for field, value in (("max_tokens", args.max_tokens), ("temperature", args.temperature),
                         ("top_p", args.top_p), ("top_k", args.top_k), ("seed", args.seed),
                         ("thinking_token_budget", args.thinking_budget)):
        if value is not None:
            setattr(req, field, value)
    if args.json_schema:
        schema = args.json_schema
        req.structured.json_schema = Path(schema[1:]).read_text() if schema.startswith("@") else schema
    elif args.regex:
        req.structured.regex = args.regex
    elif args.choice:
        req.structured.choice.choices.extend(args.choice)
    return req


def _generate(args: argparse.Namespace) -> int:
    req = build_request(args)
    with client.channel(args.address, args.ca_file) as ch:
        stub = pbg.GenerationStub(ch)
        if args.stream:
            last = None
            for msg in stub.GenerateStream(req, timeout=args.timeout, metadata=client.metadata()):
                print(msg.text, end="", flush=True)
                last = msg
            print()
            if last is not None:
                _summary(last.finish_reason, last.usage, last.timings)
        else:
            resp = stub.Generate(req, timeout=args.timeout, metadata=client.metadata())
            if args.json:
                from google.protobuf.json_format import MessageToDict

                print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2))
            else:
                print(resp.text)
                _summary(resp.finish_reason, resp.usage, resp.timings)
    return 0


def _summary(finish: str, usage: pb.Usage, t: pb.Timings) -> None:
    tps = usage.completion_tokens / (t.total_ms / 1000) if t.total_ms else 0.0
    kv = f"kv_transfer={t.kv_transfer_ms:.1f}ms/{t.kv_transfer_bytes / 1e6:.2f}MB " if t.kv_transfer_bytes else ""
    kv += "prefill=on-decode " if t.local_prefill else ""
    cached = f" cached={usage.cached_tokens}" if usage.cached_tokens else ""
    print(
        f"[finish={finish} prompt={usage.prompt_tokens}{cached} completion={usage.completion_tokens} "
        f"ttft={t.ttft_ms:.0f}ms {kv}total={t.total_ms:.0f}ms {tps:.1f} tok/s]",
        file=sys.stderr,
    )


# -- status -----------------------------------------------------------------------------------------
def _status(args: argparse.Namespace) -> int:
    with client.channel(args.address, args.ca_file) as ch:
        resp = pbg.GenerationStub(ch).Status(pb.StatusRequest(), timeout=30, metadata=client.metadata())
    workers = [
        {"role": w.role, "id": w.id, "state": w.state, "restarts": w.restarts, "node": w.node,
         "running": w.running, "waiting": w.waiting,
         "kv_blocks_used": w.kv_blocks_used, "kv_blocks_total": w.kv_blocks_total,
         "prompt_tokens_computed": w.prompt_tokens_computed, "tokens_generated": w.tokens_generated,
         "preemptions": w.preemptions, "recomputed_tokens": w.recomputed_tokens,
         "kv_blocks_cached": w.kv_blocks_cached, "prefix_hit_tokens": w.prefix_hit_tokens,
         "requests_prefilled": w.requests_prefilled}
        for w in resp.workers
    ]
    if args.json:
        print(json.dumps({"workers": workers}, indent=2))
        return 0
    cols = list(workers[0]) if workers else []
    print("  ".join(f"{c:>12}" for c in cols))
    for w in workers:
        print("  ".join(f"{str(w[c]):>12}" for c in cols))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from cluster.bench.command import run

    return run(args)


def _prepare(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    from engine.model_loader import resolve_path

    path = resolve_path(load_config(args.config).model)
    print(f"model ready: {path or 'tiny (built in-process)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
