"""`python -m tests.faults.driver '<json fault or list>' [overrides...]`: the real `python -m train` (run through
runpy, as `-m` does) with faults injected into the trainer of a stage, for tests that need a fault at an exact moment.

Faults (json): {"kind": "signal", "stage", "step", "signal"}: the process signals itself in the middle of that
step (after forward, before backward). {"kind": "pause", "stage", "step", "marker"}: in the middle of that step,
write `marker` and wait (up to 60 s) until a signal from outside has been received. {"kind": "nan", "stage",
"steps"}: the student's MLP outputs are NaN during those steps. {"kind": "kill9", "stage", "nth"}: the nth write of
the stage's last.ckpt stops halfway with SIGKILL.
"""

from __future__ import annotations

import io
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path

import lightning as L
import torch


class Inject(L.Callback):
    def __init__(self, fault: dict):
        self.fault = fault
        self.hooks = []
        self.fired = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.fault["kind"] == "nan" and trainer.global_step in self.fault["steps"]:
            for name, module in pl_module.named_modules():
                if name.endswith("mlp"):
                    self.hooks.append(module.register_forward_hook(lambda m, i, out: out * float("nan")))

    def on_before_backward(self, trainer, pl_module, loss):
        kind = self.fault["kind"]
        if self.fired or trainer.global_step != self.fault.get("step"):
            return
        self.fired = True
        if kind == "signal":
            os.kill(os.getpid(), getattr(signal, self.fault["signal"]))
        elif kind == "pause":
            from train.runtime.preemption import PreemptionCheckpoint

            watcher = next(c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint))
            Path(self.fault["marker"]).write_text(str(trainer.global_step))
            deadline = time.monotonic() + 60
            while watcher.received is None and time.monotonic() < deadline:
                time.sleep(0.02)

    def on_train_batch_end(self, trainer, *args):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def kill_during_write(stage: str, nth: int) -> None:
    real_save = torch.save
    count = 0

    def save(obj, f, *args, **kwargs):
        nonlocal count
        name = str(getattr(f, "name", f))
        if f"/{stage}/checkpoints/.last.ckpt.tmp-" in name:
            count += 1
            if count == nth:
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def main() -> None:
    faults = json.loads(sys.argv[1])
    faults = faults if isinstance(faults, list) else [faults]
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    for fault in faults:
        if fault["kind"] == "kill9":
            kill_during_write(fault["stage"], fault["nth"])
    import train.runtime.trainer

    make_trainer = train.runtime.trainer.make_trainer

    def with_faults(*args, **kwargs):
        trainer, checkpoint = make_trainer(*args, **kwargs)
        for fault in faults:
            if fault["kind"] != "kill9" and Path(trainer.default_root_dir).name == fault["stage"]:
                trainer.callbacks.append(Inject(fault))
        return trainer, checkpoint

    train.runtime.trainer.make_trainer = with_faults  # before train.pipeline imports it
    runpy.run_module("train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
