"""The supervisor's verdicts with fake workers: a lost worker that answers is taken back, a new boot
id is re-wired and counted as a restart, silence is lost (and the live workers drop their links to it)."""
from __future__ import annotations

import asyncio
from typing import Any

from cluster.supervisor import Supervisor
from router.config import LimitsConfig
from router.dispatcher import Dispatcher, WorkerRef


class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *a: Any) -> Any:
        return self.fn(*a)


class FakeWorker:
    def __init__(self, boot: str) -> None:
        self.boot: str | None = boot
        self.ready = _Method(self._ready)

    async def _ready(self) -> str:
        if self.boot is None:
            await asyncio.sleep(10)  # no answer
        return str(self.boot)


class FakeCluster:
    def __init__(self, workers: dict[str, FakeWorker]) -> None:
        self.workers = workers
        self.boots = {w: str(h.boot) for w, h in workers.items()}
        self.rewired: list[tuple[str, str]] = []
        self.forgotten: list[tuple[str, set[str]]] = []
        self.reconnected: list[str] = []
        self.cfg = type("C", (), {"cluster": type("CC", (), {"health_check_interval_s": 0.5})()})()

    def forget(self, wid: str, live: set[str]) -> bool:
        self.forgotten.append((wid, live))
        return wid.startswith("decode")

    def reconnect(self, wid: str, live: set[str]) -> None:
        self.reconnected.append(wid)

    def rewire(self, wid: str, boot: str, live: set[str]) -> None:
        self.boots[wid] = boot
        self.rewired.append((wid, boot))


def test_verdicts() -> None:
    async def main() -> None:
        p, d = FakeWorker("a"), FakeWorker("b")
        cluster = FakeCluster({"prefill-0": p, "decode-0": d})
        disp = Dispatcher([WorkerRef("prefill-0", p)], [WorkerRef("decode-0", d)], (2,), LimitsConfig())
        sup = Supervisor(cluster, disp)  # type: ignore[arg-type]
        disp.mark_lost("prefill-0", "a late error about its old process")  # it is fine, in fact
        await sup.check()
        assert not disp.is_lost("prefill-0") and disp.restarts.get("prefill-0", 0) == 0
        p.boot = "a2"  # Ray restarted it
        await sup.check()
        assert cluster.rewired == [("prefill-0", "a2")] and disp.restarts["prefill-0"] == 1
        assert not disp.is_lost("prefill-0")
        assert cluster.forgotten == []
        d.boot = None  # silent
        await sup.check()
        assert disp.is_lost("decode-0") and not disp.serving
        assert cluster.forgotten == [("decode-0", {"prefill-0"})]  # the live workers let go of it, once
        await sup.check()
        assert len(cluster.forgotten) == 1
        d.boot = "b"  # it was only slow: the same process answers again, and is wired again first
        await sup.check()
        assert cluster.reconnected == ["decode-0"] and not disp.is_lost("decode-0") and disp.serving
        assert disp.restarts.get("decode-0", 0) == 0
        await sup.check()
        assert cluster.reconnected == ["decode-0"]  # once
        assert cluster.rewired == [("prefill-0", "a2")]  # and nothing else was re-wired
        p.boot = None  # a slow prefill worker: no links of its own were dropped ...
        await sup.check()
        assert disp.is_lost("prefill-0") and cluster.forgotten[-1][0] == "prefill-0"
        p.boot = "a2"
        await sup.check()  # ... so it serves again as it is: re-wiring would fail its writes in flight
        assert not disp.is_lost("prefill-0") and cluster.reconnected == ["decode-0"]

    asyncio.run(main())
