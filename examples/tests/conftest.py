import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the examples folder: hdgsa_block

# cuBLAS is deterministic only with a fixed workspace; set before CUDA starts (the recompute
# tests turn torch.use_deterministic_algorithms on).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
