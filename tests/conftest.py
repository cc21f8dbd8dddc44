import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("STEERFLOW_TEST_THREADS", "1")))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
