"""verifiers environments trained through asympo: run by `./run test-verifiers`, in ./.venv-verifiers
(verifiers' own dependencies stay out of .venv). Outside that environment nothing here is collected."""

import importlib.util

import torch

collect_ignore_glob = [] if importlib.util.find_spec("verifiers") else ["test_*.py"]
torch.set_num_threads(2)
