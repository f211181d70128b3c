"""SIGTERM to `pdserve serve` with 8 streams running: health turns NOT_SERVING, new requests get
UNAVAILABLE, the streams that can finish within server.grace_period_s finish, the others end with
UNAVAILABLE, and the process exits leaving no Ray process behind."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.pdserve.v1 import generation_pb2 as pb
from protos.pdserve.v1 import generation_pb2_grpc as pbg

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray_cluster  # `pdserve serve` starts Ray in its own process


def _descendants(pid: int) -> set[int]:
    """The processes started under `pid` (Ray's gcs_server, raylet, workers, ...)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.split("\n"):
        if line.strip():
            c, p = map(int, line.split())
            children.setdefault(p, []).append(c)
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def _alive(pids: set[int]) -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-p", ",".join(map(str, pids))], capture_output=True,
                         text=True).stdout if pids else ""
    return [line for line in out.split("\n") if line.strip() and " Z" not in line[:15]]


def test_sigterm_drains_then_exits_clean(tmp_path: Path) -> None:
    cfg = {
        "model": {"path": "tiny", "max_model_len": 2048},
        "prefill": {"num_cpus": 0.5}, "decode": {"num_cpus": 0.5},
        "kv_cache": {"num_blocks": 1024},
        "server": {"port": 0, "grace_period_s": 1},
        "limits": {"max_prompt_tokens": 1024},
        "cluster": {"num_cpus": 2, "name": "drain-test"},
    }
    path = tmp_path / "drain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--config", str(path)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()  # type: ignore[union-attr]
    try:
        end = time.monotonic() + 120
        port = None
        while port is None and time.monotonic() < end and proc.poll() is None:
            m = next((re.search(r"serving pdserve.v1.Generation on [\d.]+:(\d+)", ln) for ln in lines if "serving" in ln), None)
            port = int(m.group(1)) if m else None
            time.sleep(0.2)
        assert port, "".join(lines)
        ray_pids = _descendants(proc.pid)
        assert len(ray_pids) >= 3, "the server's Ray processes are not found"  # gcs, raylet, workers
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub, health = pbg.GenerationStub(ch), health_pb2_grpc.HealthStub(ch)
        ends: dict[int, Any] = {}
        started = threading.Barrier(9, timeout=60)

        def stream(i: int) -> None:  # 6 short ones finish within the 1 s grace, 2 long ones cannot
            n = 10 if i < 6 else 1000
            it = stub.GenerateStream(pb.GenerateRequest(prompt=f"drain {i}", max_tokens=n, ignore_eos=True), timeout=120)
            try:
                next(it)
                started.wait()
                ends[i] = ("ok", 1 + sum(len(m.token_ids) for m in it))
            except grpc.RpcError as e:
                ends[i] = (e.code(), e.details())

        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        started.wait()
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() - t0 < 3
            time.sleep(0.05)
        try:
            stub.Generate(pb.GenerateRequest(prompt="late", max_tokens=2), timeout=5)
            raise AssertionError("a request was accepted while draining")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in (e.details() or "")
        for t in threads:
            t.join(30)
        assert all(ends.get(i) == ("ok", 10) for i in range(6)), sorted(ends.items())
        assert all(ends[i][0] == grpc.StatusCode.UNAVAILABLE and "shutting down" in ends[i][1] for i in (6, 7)), [ends[6], ends[7]]
        assert proc.wait(60) == 0, "".join(lines)
        time.sleep(2)
        assert not _alive(ray_pids), _alive(ray_pids)
    finally:
        if proc.poll() is None:
            proc.kill()
