import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

if not torch.cuda.is_available():  # the CUDA kernels (engine/triton_attention.py) run interpreted on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
