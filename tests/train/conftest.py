"""Fixtures shared by tests/train."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """The tensors of the loss tests are tiny: on a busy 2-core machine intra-op threads make them ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
