"""The fused paged decode-attention kernel (engine/csrc/paged_attention.cpp), built on first use.

Compiled once per machine with torch's C++ extension loader (g++ and ninja; ~40 s, cached under
~/.cache/torch_extensions). If it cannot be built, `load()` returns None and the runner keeps its
gather + SDPA path: same results up to float rounding, slower.
"""
from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_SRC = Path(__file__).with_name("csrc") / "paged_attention.cpp"
_module: Any = None
_tried = False


def load() -> Any:
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get("PDSERVE_NO_KERNEL"):
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory, load as build

        lock_dir = Path(_get_build_directory("pdserve_paged_attention", verbose=False))
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / ".pdserve.lock", "w") as lock:  # one builder at a time per machine
            fcntl.flock(lock, fcntl.LOCK_EX)
            _module = build(
                name="pdserve_paged_attention", sources=[str(_SRC)],
                extra_cflags=["-O3", "-march=native", "-ffast-math"], verbose=False,
            )
    except Exception as e:  # noqa: BLE001 — no compiler, no ninja, odd platform: fall back
        log.warning("paged attention kernel unavailable (%s); using gather + SDPA", e)
        _module = None
    return _module
