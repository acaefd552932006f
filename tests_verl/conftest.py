"""The verl integration tests: run by `./run test-verl`, in ./.venv-verl (verl's pins clash with .venv).

Outside that environment (no verl) nothing here is collected, so a stray `pytest tests_verl` skips cleanly.
"""

import importlib.util

import torch

collect_ignore_glob = [] if importlib.util.find_spec("verl") else ["test_*.py"]
torch.set_num_threads(2)
