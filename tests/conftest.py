import ast
import os
import sys
from functools import cache
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # the CUDA kernels (engine/triton_attention.py) run interpreted on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")


@cache
def starts_ray(path: str) -> bool:
    """A test module that imports ray or the served-cluster harness (RunningServer), or names the
    `ray_cluster` mark (one that runs `pdserve serve` as a process), starts a local Ray instance."""
    tree = ast.parse((ROOT / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "ray" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and any(a.name == "RunningServer" for a in node.names):
            return True
        if isinstance(node, ast.Attribute) and node.attr == "ray_cluster":
            return True
    return False


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without it (-p no:xdist), never called
def pytest_xdist_make_scheduler(config: Any, log: Any) -> Any:
    """`make test` runs the suite on two workers (`-n 2`, pytest-xdist). Each test module runs whole
    on one worker (its module fixtures start once), and every module that starts Ray joins one unit,
    so no two Ray instances run at once: a `ray.init()` may join another local instance it finds
    (/tmp/ray/ray_current_cluster, written by test_multinode's cluster), and two clusters on 2 cores
    would starve each other's deadlines. (xdist's own `--dist loadgroup` ignores its marks under
    pytest 9.2: pytest-dev/pytest-xdist#1386.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByModuleRayTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "ray" if path.endswith(".py") and starts_ray(path) else path

    return ByModuleRayTogether(config, log)
