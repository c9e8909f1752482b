"""Logged training throughput covers the whole step (forward, backward, optimizer, data wait), not the forward."""

import time

import torch

from train.stages.module import DistillModule


def test_step_wall_time_spans_batch_to_next_batch():
    module = DistillModule(torch.nn.Linear(2, 2), optim={})
    module.on_train_batch_start(None, 0)
    assert module._last_step is None  # nothing measured before a whole step has passed
    module._step_work = (4096, 10)  # what log_throughput records for the step's batch
    time.sleep(0.05)  # stands in for backward + optimizer step, after training_step has returned
    module.on_train_batch_start(None, 1)
    tokens, flops, seconds = module._last_step
    assert (tokens, flops) == (4096, 10) and seconds >= 0.05
