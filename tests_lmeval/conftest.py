"""lm-evaluation-harness against `asympo serve`: run by `./run test-lmeval`, in ./.venv-lmeval (lm-eval's own
dependencies stay out of .venv). Outside that environment nothing here is collected."""

import importlib.util
import sys
from pathlib import Path

import torch

collect_ignore_glob = [] if importlib.util.find_spec("lm_eval") else ["test_*.py"]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/serving.py
torch.set_num_threads(2)
