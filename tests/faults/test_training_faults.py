"""Faults during training: a NaN / inf loss (skip or stop, with a checkpoint), SIGTERM and SIGUSR1 in the middle of a
step (checkpoint, exit 128 + signal, resume to the same weights), kill -9 during a checkpoint write and a full disk
(the previous checkpoint still loads), a damaged checkpoint, resuming at another world size."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from train.config import compose_config, validate_config
from train.pipeline import run
from train.runtime.checkpoint_io import AtomicCheckpointIO, check_resumable
from train.runtime.faults import CheckpointError, NonFiniteLossError

from .conftest import REPO, cli, driver_command, last_line, small


def _step(checkpoint: Path) -> int:
    return torch.load(checkpoint, weights_only=True, map_location="cpu")["global_step"]


def _max_difference(a: Path, b: Path) -> float:
    ma = AutoModelForCausalLM.from_pretrained(a, trust_remote_code=True)
    mb = AutoModelForCausalLM.from_pretrained(b, trust_remote_code=True)
    return max((p - q).abs().max().item() for p, q in zip(ma.parameters(), mb.parameters(), strict=True))


def test_sigterm_sigusr1_and_kill9_then_resume_to_the_same_weights(tmp_path, teacher_cache, reference):
    out = tmp_path / "run"
    args = small(out, teacher_cache, "stages=[init,ild,kd]")
    # SIGTERM from outside, to the whole process group (as SLURM does: DataLoader workers get it too), while step
    # 2 of ILD is between its forward and its backward.
    marker = tmp_path / "in_step"
    fault = {"kind": "pause", "stage": "ild", "step": 2, "marker": str(marker)}
    proc = subprocess.Popen(
        driver_command(fault, *args, "data.num_workers=1"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    print(stderr.splitlines()[-1])
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "ild: stopped by SIGTERM after step 3" in stderr.splitlines()[-1] and "last.ckpt" in stderr.splitlines()[-1]
    assert _step(out / "ild" / "checkpoints" / "last.ckpt") == 3  # the step that was running, finished
    assert not (out / "ild" / "done.json").exists()

    # SIGUSR1 (SLURM's early warning) raised inside step 1 of KD; ILD resumes from step 3 and finishes first.
    fault = {"kind": "signal", "stage": "kd", "step": 1, "signal": "SIGUSR1"}
    result = subprocess.run(driver_command(fault, *args), cwd=REPO, capture_output=True, text=True, timeout=300)
    print(last_line(result))
    assert result.returncode == 128 + signal.SIGUSR1, result.stderr[-3000:]
    assert "kd: stopped by SIGUSR1 after step 2" in last_line(result)
    assert (out / "ild" / "done.json").exists() and _step(out / "kd" / "checkpoints" / "last.ckpt") == 2

    # kill -9 halfway through the next write of KD's last.ckpt (step 4): the one of step 2 stays whole.
    result = subprocess.run(
        driver_command({"kind": "kill9", "stage": "kd", "nth": 1}, *args),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    folder = out / "kd" / "checkpoints"
    stale = list(folder.glob(".last.ckpt.tmp-*"))
    assert len(stale) == 1 and stale[0].stat().st_size > 0  # the half-written file of the killed process
    assert _step(folder / "last.ckpt") == 2

    result = cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(folder.glob(".last.ckpt.tmp-*"))  # the next write removed the dead writer's file
    assert not list(folder.glob("last-v*.ckpt"))  # resumed stages keep writing the file they resume from
    worst = _max_difference(reference[0] / "kd" / "student", out / "kd" / "student")
    print(f"max weight difference, interrupted three times vs uninterrupted: {worst:.2e}")
    assert worst == 0.0


class NanAt(L.Callback):
    """The student's MLP outputs turn NaN during the given steps (so do the loss and the gradients)."""

    def __init__(self, steps):
        self.steps, self.hooks = set(steps), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            for name, module in pl_module.named_modules():
                if name.endswith("mlp"):
                    self.hooks.append(module.register_forward_hook(lambda m, i, out: out * float("nan")))

    def on_train_batch_end(self, trainer, *args):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


class Snapshots(L.Callback):
    """Trainable weights before and after each step."""

    def __init__(self):
        self.before, self.after = {}, {}

    @staticmethod
    def _weights(module):
        return [p.detach().clone() for p in module.parameters() if p.requires_grad]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = self._weights(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.after[trainer.global_step - 1] = self._weights(pl_module)


def test_nonfinite_loss_is_skipped_by_default(tmp_path, teacher_cache):
    overrides = ["stages=[init,ild]", "trainer.log_every_n_steps=1", "ild.max_steps=5"]
    cfg = compose_config(small(tmp_path, teacher_cache, *overrides))
    validate_config(cfg)
    snapshots = Snapshots()
    run(cfg, callbacks={"ild": [NanAt([2]), snapshots]})  # faults.nonfinite_loss=skip, max_skips=10
    assert all(torch.equal(a, b) for a, b in zip(snapshots.before[2], snapshots.after[2], strict=True))
    moved = [not torch.equal(a, b) for a, b in zip(snapshots.before[3], snapshots.after[3], strict=True)]
    assert any(moved)  # the next step trains again
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "ild" / "student", trust_remote_code=True)
    assert all(torch.isfinite(p).all() for p in student.parameters())
    metrics = (tmp_path / "ild" / "logs" / "metrics.csv").read_text()
    assert "train/nonfinite_skips" in metrics
    # The end of training is on disk even between periodic checkpoints (every 2 steps here).
    assert _step(tmp_path / "ild" / "checkpoints" / "last.ckpt") == 5


def test_nonfinite_loss_stop_policy_saves_a_checkpoint_and_says_so(tmp_path, teacher_cache):
    args = small(tmp_path, teacher_cache, "stages=[init,ild]", "faults.nonfinite_loss=stop")
    fault = {"kind": "nan", "stage": "ild", "steps": [3]}
    result = subprocess.run(driver_command(fault, *args), cwd=REPO, capture_output=True, text=True, timeout=300)
    message = last_line(result)
    print(message)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "ild: non-finite loss (nan) at step 4" in message and "faults.nonfinite_loss=stop" in message
    checkpoint = tmp_path / "ild" / "checkpoints" / "last.ckpt"
    assert message.count(str(checkpoint)) == 1
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    assert state["global_step"] == 4 and all(torch.isfinite(t).all() for t in state["state_dict"].values())


class TeacherNanAt(NanAt):
    """The frozen teacher's MLP outputs turn NaN during the given steps (a broken teacher, not the student)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            for name, module in pl_module.teacher.named_modules():
                if name.endswith("mlp"):
                    self.hooks.append(module.register_forward_hook(lambda m, i, out: out * float("nan")))


@pytest.mark.parametrize("stage", ["ild", "kd"])
def test_a_non_finite_teacher_is_named_by_the_loss_policy(tmp_path, teacher_cache, stage):
    cfg = compose_config(small(tmp_path, teacher_cache, f"stages=[init,{stage}]", "faults.nonfinite_loss=stop"))
    with pytest.raises(NonFiniteLossError) as info:
        run(cfg, callbacks={stage: [TeacherNanAt([1])]})
    message = str(info.value)
    assert f"{stage}: non-finite loss (nan) from the teacher: the teacher " in message, message
    assert "(float32) gave non-finite outputs" in message and "teacher.dtype" in message
    with pytest.raises(NonFiniteLossError) as info:  # the student's own NaN: the teacher is not blamed
        run(compose_config(small(tmp_path / "s", teacher_cache, "stages=[init,kd]", "faults.nonfinite_loss=stop")),
            callbacks={"kd": [NanAt([1])]})  # fmt: skip
    assert "from the teacher" not in str(info.value) and "lower the learning rate" in str(info.value)


def test_skips_beyond_max_skips_stop(tmp_path, teacher_cache):
    from train.runtime.faults import NonFiniteLossGuard

    cfg = compose_config(small(tmp_path, teacher_cache, "stages=[init,ild]"))
    guard = NonFiniteLossGuard("skip", max_skips=1)
    with pytest.raises(NonFiniteLossError, match="more than faults.max_skips=1"):
        run(cfg, callbacks={"ild": [guard, NanAt([1, 3])]})
    state = torch.load(tmp_path / "ild" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 4 and state["callbacks"]["NonFiniteLossGuard"] == {"skipped": 2}
    run(cfg)  # rerun: continues after the bad batch (the fault is gone now) and finishes the stage
    assert (tmp_path / "ild" / "done.json").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_during_a_checkpoint_write(tmp_path, teacher_cache):
    """The write of last.ckpt at step 4 goes to /dev/full (a real ENOSPC from the kernel)."""

    class FullDisk(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                tmp = tmp_path / "ild" / "checkpoints" / f".last.ckpt.tmp-{os.getpid()}"
                tmp.symlink_to("/dev/full")

    cfg = compose_config(small(tmp_path, teacher_cache, "stages=[init,ild]"))
    with pytest.raises(CheckpointError) as info:
        run(cfg, callbacks={"ild": [FullDisk()]})
    message = str(info.value)
    print(message)
    last = tmp_path / "ild" / "checkpoints" / "last.ckpt"
    assert "No space left on device" in message and str(last) in message and "intact" in message
    assert "\n" not in message
    assert _step(last) == 2  # the previous checkpoint loads
    assert not list(last.parent.glob(".last.ckpt.tmp-*"))
    run(cfg)  # space is back: resumes from step 2 and finishes
    assert (tmp_path / "ild" / "done.json").exists()


def test_damaged_checkpoint_is_named(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"global_step": 3, "state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*last.ckpt.*damaged"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_deepspeed_checkpoints_are_refused_at_another_world_size_or_strategy(tmp_path):
    """ZeRO shards optimizer state per rank: a checkpoint of 2 ranks cannot resume on 1 (or without DeepSpeed)."""
    ckpt = tmp_path / "last.ckpt"
    (ckpt / "checkpoint").mkdir(parents=True)
    (ckpt / "latest").write_text("checkpoint")
    for rank in range(2):
        (ckpt / "checkpoint" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    (ckpt / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"")
    check_resumable(ckpt, deepspeed=True, world_size=2)  # same size: fine
    with pytest.raises(CheckpointError, match="ZeRO checkpoint of 2 ranks, but this run has 1"):
        check_resumable(ckpt, deepspeed=True, world_size=1)
    with pytest.raises(CheckpointError, match="DeepSpeed checkpoint directory but this run does not use DeepSpeed"):
        AtomicCheckpointIO().load_checkpoint(ckpt)
    single = tmp_path / "single.ckpt"
    torch.save({"global_step": 1}, single)
    with pytest.raises(CheckpointError, match="single-file checkpoint"):
        check_resumable(single, deepspeed=True, world_size=2)
    check_resumable(single, deepspeed=False, world_size=4)  # full state: any world size


class RankFault(L.Callback):
    """Under DDP: NaN MLP outputs on one rank at one step, a signal on one rank in the middle of another step, and
    each rank's trainable-weight sum around the NaN step, written to `probe/`."""

    def __init__(self, probe: Path, nan_step: int, nan_rank: int, signal_step: int, signal_rank: int):
        self.probe, self.nan = probe, (nan_step, nan_rank)
        self.signal = (signal_step, signal_rank)
        self.hooks = []

    def _total(self, pl_module) -> float:
        return float(sum(p.detach().double().sum() for p in pl_module.parameters() if p.requires_grad))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.nan[0]:
            (self.probe / f"before{trainer.global_rank}").write_text(repr(self._total(pl_module)))
            if trainer.global_rank == self.nan[1]:
                for name, module in pl_module.named_modules():
                    if name.endswith("mlp"):
                        self.hooks.append(module.register_forward_hook(lambda m, i, out: out * float("nan")))

    def on_before_backward(self, trainer, pl_module, loss):
        if (trainer.global_step, trainer.global_rank) == self.signal:
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.nan[0] + 1:
            (self.probe / f"after{trainer.global_rank}").write_text(repr(self._total(pl_module)))
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def test_ddp_faults_then_resume_at_another_world_size(tmp_path, teacher_cache):
    """Two CPU ranks (gloo): a NaN on rank 1 alone drops the update on both; SIGUSR1 on rank 0 alone stops both
    after the step with one checkpoint; that checkpoint resumes on one process (the data stream re-splits)."""
    args = small(tmp_path, teacher_cache, "stages=[init,ild]")
    probe = tmp_path / "probe"
    probe.mkdir()
    ddp = compose_config([*args, "trainer.devices=2", "strategy=ddp", "strategy.name=ddp_spawn"])
    validate_config(ddp)
    # Every rank stops naming the signal (rank 1 did not receive it), so whichever the launcher reports says SIGUSR1.
    with pytest.raises(Exception, match="stopped by SIGUSR1 after step 3"):
        run(ddp, callbacks={"ild": [RankFault(probe, nan_step=1, nan_rank=1, signal_step=2, signal_rank=0)]})
    for rank in (0, 1):
        assert (probe / f"before{rank}").read_text() == (probe / f"after{rank}").read_text()
    last = tmp_path / "ild" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    micro = 2  # data.micro_batch_size
    assert state["global_step"] == 3 and state["DistillDataModule"]["phases"]["ild"]["consumed"] == 3 * 2 * micro
    run(compose_config(args))  # one process: continues the same stream from row 12
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 6 and state["DistillDataModule"]["phases"]["ild"]["consumed"] == 12 + 3 * micro
    assert (tmp_path / "ild" / "done.json").exists()


class AtBatch(L.Callback):
    """NaN MLP outputs in micro-batch `nan`, SIGUSR1 to this process in the middle of micro-batch `signal`."""

    def __init__(self, nan: int, signal_at: int):
        self.nan, self.signal_at, self.hooks = nan, signal_at, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.nan:
            for name, module in pl_module.named_modules():
                if name.endswith("mlp"):
                    self.hooks.append(module.register_forward_hook(lambda m, i, out: out * float("nan")))

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.fit_loop.epoch_loop.batch_idx == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_train_batch_end(self, trainer, *args):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def test_gradient_accumulation_faults_act_on_whole_steps(tmp_path, teacher_cache):
    """With 2 micro-batches per step: a NaN in the first micro-batch of step 2 drops that step's update; SIGUSR1 in
    the first micro-batch of step 3 stops after step 3's optimizer step (accumulated gradients are not saved)."""
    from train.runtime.faults import Preempted

    cfg = compose_config(small(tmp_path, teacher_cache, "stages=[init,ild]", "trainer.accumulate_grad_batches=2"))
    snapshots = Snapshots()
    with pytest.raises(Preempted, match="stopped by SIGUSR1 after step 3"):
        run(cfg, callbacks={"ild": [AtBatch(nan=2, signal_at=4), snapshots]})
    assert all(torch.equal(a, b) for a, b in zip(snapshots.before[1], snapshots.after[1], strict=True))
    state = torch.load(tmp_path / "ild" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 3 and state["DistillDataModule"]["phases"]["ild"]["consumed"] == 6 * 2


def test_a_resumed_stage_shows_its_steps_in_the_progress_bar(tmp_path, teacher_cache):
    """Lightning's bars showed `Epoch 0/-2` and `60/43` after a resume (epochs of an endless stream, batches of a
    pass); the bar shows the stage's optimizer steps against its max_steps, starting where the checkpoint stopped."""
    args = [*small(tmp_path / "run", teacher_cache, "stages=[init,ild]"), "trainer.enable_progress_bar=true"]
    fault = {"kind": "signal", "stage": "ild", "step": 2, "signal": "SIGUSR1"}
    stopped = subprocess.run(driver_command(fault, *args), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 128 + signal.SIGUSR1, stopped.stderr[-3000:]

    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    shown = [s.strip() for s in (resumed.stdout + resumed.stderr).replace("\r", "\n").splitlines() if "ild" in s]
    bars = [s for s in shown if "/6 [" in s]
    assert bars, (resumed.stdout + resumed.stderr)[-3000:]
    print(bars[0], "...", bars[-1], sep="\n")
    assert bars[0].startswith("ild:") and "| 3/6 [" in bars[0]  # the resumed stage starts at its checkpoint's step
    assert "| 6/6 [" in bars[-1]
    assert not any("Epoch" in s or "/-" in s for s in shown)


class SignalAfterLastStep(L.Callback):
    """SIGTERM to this process while the fit ends (after its last step), as a deadline can land."""

    def on_train_end(self, trainer, pl_module):
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_after_the_last_step_stops_before_the_next_stage(tmp_path, teacher_cache):
    """The fidelity benchmark's SIGTERM landed while ILD finished: the stage completed and the run went on into SMART
    and KD past its deadline. Now the finished stage is kept and the run stops before the next one; a rerun goes on."""
    from train.runtime.faults import Preempted

    cfg = compose_config(small(tmp_path, teacher_cache, "stages=[init,ild,kd]"))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="stage ild: finished, then stopped by SIGTERM .* before stage kd") as stop:
        run(cfg, callbacks={"ild": [SignalAfterLastStep()]})
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert (tmp_path / "ild" / "done.json").exists() and not (tmp_path / "kd").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # the fit's handler is gone with it
    report = run(cfg)  # the rerun skips ILD and trains KD
    assert (tmp_path / "kd" / "done.json").exists() and "kd" in report["stage_seconds"]


def test_a_late_signal_left_by_an_earlier_run_does_not_stop_the_next(tmp_path, teacher_cache, monkeypatch):
    """A stage that fails after its fit (a post-fit error) leaves its late signal unconsumed; the next run in the same
    process (tests, notebooks) must not take it for its own."""
    from train.runtime import preemption

    monkeypatch.setattr(preemption, "_late_signal", signal.SIGTERM)
    run(compose_config(small(tmp_path, teacher_cache, "stages=[init,ild]")))
    assert (tmp_path / "ild" / "done.json").exists() and preemption.take_late_signal() is None
