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


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory):
    """The tiny teacher's cache folder, shared by the pipeline tests of every module here (test_pipeline, test_wandb,
    test_eval_placement): the same settings give the same teacher, trained once (~11 s) instead of once a module."""
    return tmp_path_factory.mktemp("tiny_teacher")
