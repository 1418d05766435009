import os

import pytest
import torch
from hypothesis import settings

# Deterministic by default: the same examples every run, no per-example deadline on a shared CPU.
settings.register_profile("default", derandomize=True, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(min(2, torch.get_num_threads()))

# The latency checks warn instead of refusing in this suite (and the commands it starts): a shared machine's noise
# must not fail a functional test. The tests of the checks themselves set "refuse".
os.environ.setdefault("NAS_LATENCY_CHECKS", "warn")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
