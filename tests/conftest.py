from __future__ import annotations

import os

import pytest
import torch

# Two cores here and in CI: more threads than that only adds contention between tests.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def lidc_root():
    from training.data.lidc_sample import default_root

    root = default_root()
    if not root.is_dir():
        pytest.fail(f"the LIDC sample is missing at {root}; it lives in shared/data beside the repository")
    return root
