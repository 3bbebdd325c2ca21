import os

import pytest
import torch

# GPU tests live in tests/gpu and are collected only where CUDA exists (the
# device machine: `make test-gpu`); on the CPU they are not collected rather
# than skipped.
collect_ignore_glob = [] if torch.cuda.is_available() else ["gpu/*"]

os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
