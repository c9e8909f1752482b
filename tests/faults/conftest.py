"""Helpers for the fault tests: the real CLI in a subprocess, a shrunk tiny preset, one tiny teacher per session."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from data.corpus import tiny_corpus_path

REPO = Path(__file__).resolve().parents[2]


def small(out: Path, teacher_cache: Path, *extra: str) -> list[str]:
    """Overrides shrinking the tiny preset to seconds: a 10-step teacher, 64-token rows, 6 ILD and 4 KD steps, and
    the first 400 documents of the embedded corpus (~100 ILD and ~400 KD rows, far more than any test reads; the
    whole corpus costs ~2.5 s more per run, packing its 9000 documents in every stage's data setup)."""
    return [
        f"output_dir={out}",
        f"data.sources=[{{name_or_path:'{tiny_corpus_path()}',max_samples:400}}]",
        f"teacher.tiny.cache_dir={teacher_cache}",
        "teacher.tiny.train_steps=10",
        "teacher.tiny.batch_size=4",
        "teacher.tiny.seq_len=64",
        "data.seq_len=64",
        "data.micro_batch_size=2",
        "data.num_workers=0",
        "data.eval_max_rows=2",
        "ild.max_steps=6",
        "ild.warmup_steps=1",
        "ild.val_every_n_steps=100",
        "ild.checkpoint_every_n_steps=2",
        "kd.max_steps=4",
        "kd.warmup_steps=1",
        "kd.val_every_n_steps=100",
        "kd.checkpoint_every_n_steps=2",
        "eval.max_batches=1",
        "eval.num_generations=0",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


def cli(*args: str, env: dict | None = None, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """`python -m train <args>` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        **popen,
    )


# What `python -m train` imports to check its config and to run the stages (train/__main__.py): preloaded once by
# the server of `forked_cli` (tests/faults/forked_cli.py).
CLI_IMPORTS = (
    "hydra",
    "omegaconf",
    "train.config",
    "train.pipeline",
    "train.runtime.redact",
    "data.sources",
    "models.teachers",
    "lightning.pytorch.utilities.exceptions",
)


class ForkedCLI:
    """`python -m train <args>` as `cli` runs it (its own process, argv, environment, exit code, stdout and stderr),
    forked from a server that has the imports done: for commands that end in an error within a second or two,
    whose time is nearly all startup. `forked_cli(*args, env=...)` runs one, `forked_cli.many({name: args})` several,
    two at a time."""

    def __init__(self, folder: Path):
        self.folder, self.count = folder, 0
        self.log = open(folder / "server.stderr", "w")  # noqa: SIM115 (open while the server runs)
        self.server = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.forked_cli", *CLI_IMPORTS],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            start_new_session=True,  # its children with it, should it have to be stopped
        )

    def many(
        self, commands: dict[str, list[str]], env: dict | None = None, timeout: float = 300
    ) -> dict[str, subprocess.CompletedProcess]:
        prefixes = {name: str(self.folder / f"command{self.count + i}") for i, name in enumerate(commands)}
        self.count += len(commands)
        environment = {**os.environ, **(env or {})}
        batch = [{"args": args, "env": environment, "out": prefixes[name]} for name, args in commands.items()]
        self.server.stdin.write(json.dumps(batch) + "\n")
        self.server.stdin.flush()
        ready, _, _ = select.select([self.server.stdout], [], [], timeout)
        answer = self.server.stdout.readline() if ready else ""
        if answer != "done\n":
            os.killpg(self.server.pid, signal.SIGKILL)
            server_log = (self.folder / "server.stderr").read_text()[-3000:]
            pytest.fail(f"the forked CLI server gave no answer within {timeout} s: {answer!r}\n{server_log}")
        return {
            name: subprocess.CompletedProcess(
                [sys.executable, "-m", "train", *commands[name]],
                int(Path(prefix + ".rc").read_text()),
                Path(prefix + ".stdout").read_text(),
                Path(prefix + ".stderr").read_text(),
            )
            for name, prefix in prefixes.items()
        }

    def __call__(self, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.many({"command": list(args)}, env, timeout)["command"]

    def close(self) -> None:
        self.server.stdin.close()
        try:
            self.server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait()
        self.log.close()


@pytest.fixture(scope="session")
def forked_cli(tmp_path_factory) -> ForkedCLI:
    server = ForkedCLI(tmp_path_factory.mktemp("forked_cli"))
    yield server
    server.close()


def driver_command(fault: dict, *args: str) -> list[str]:
    """`python -m train <args>` with one injected fault (tests/faults/driver.py)."""
    return [sys.executable, "-m", "tests.faults.driver", json.dumps(fault), *args]


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_teacher")


# Fake credentials: no output of a run may contain them (tests/faults/test_security.py).
SECRETS = {"WANDB_API_KEY": "wandb0secret0key0" + "7" * 23, "HF_TOKEN": "hf_SecretTokenForTests0123456789"}


@pytest.fixture(scope="session")
def reference(tmp_path_factory, teacher_cache) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted run (init, ild, kd) through the CLI, with credentials in its environment and the W&B
    logger (offline): the weights interrupted runs must reach, and the outputs secrets must stay out of."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = cli(
        *small(out, teacher_cache, "stages=[init,ild,kd]", "logger=wandb", "logger.offline=true"),
        env={**SECRETS, "WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result
