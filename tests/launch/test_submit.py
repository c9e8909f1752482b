"""`python -m launch.submit`: the config checked on the login node, the script rendered, sbatch called last."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch import submit

REPO = Path(__file__).resolve().parents[2]

FAKE_SBATCH = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/sbatch.args"
echo "777001;cluster-a"
"""


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch) -> Path:
    """A fake sbatch first on PATH (records its arguments); the current directory is a fresh submit directory."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return log / "sbatch.args"


def directives(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S*))?$", script, flags=re.M))


def test_dry_run_renders_preset_overrides_and_allocation(capsys, fake_sbatch):
    argv = ["conf=zebra_1b", "--nodes", "2", "--time", "24:00:00", "--partition", "gpu", "--account", "proj"]
    code = submit.main([*argv, "--dry-run", "--", "kd.lr=1e-4", "logger=wandb"])
    out = capsys.readouterr().out
    assert code == 0
    found = directives(out)
    assert found["nodes"] == "2" and found["ntasks-per-node"] == found["gpus-per-node"] == "8"
    assert found["time"] == "24:00:00" and found["partition"] == "gpu" and found["account"] == "proj"
    assert found["job-name"] == "zebra_1b"
    assert found["signal"].startswith("USR1@") and "requeue" in found and found["open-mode"] == "append"
    assert "set -- conf=zebra_1b kd.lr=1e-4 logger=wandb" in out.splitlines()
    assert f"export ZEBRA_REPO={REPO}" in out.splitlines()
    assert not fake_sbatch.exists() and not Path("logs").exists()  # a dry run submits and writes nothing


def test_one_node_uses_the_one_node_script_and_quotes_overrides(capsys, fake_sbatch):
    assert submit.main(["conf=tiny", "--dry-run", "--", "run_name=a b", "stages=[init,export]"]) == 0
    out = capsys.readouterr().out
    assert directives(out)["nodes"] == "1"
    assert "set -- conf=tiny 'run_name=a b' 'stages=[init,export]'" in out


def test_submit_writes_the_script_under_logs_and_calls_sbatch(capsys, fake_sbatch):
    code = submit.main(["conf=zebra_1b", "--nodes", "2", "--", "kd.lr=1e-4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    args = fake_sbatch.read_text().splitlines()
    assert args[0] == "--parsable"
    script = Path(args[1])
    assert script.parent == Path("logs") and script.suffix == ".sbatch"
    assert "set -- conf=zebra_1b kd.lr=1e-4" in script.read_text()
    assert "job 777001" in captured.out and "outputs/zebra_1b-777001" in captured.out
    assert "logs/zebra_1b-777001.out" in captured.out


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["conf=zebra_1x"], ["conf='zebra_1x'", "zebra_1b"]),  # unknown preset: the options are listed
        (["conf=zebra_1b", "--", "kd.lrr=1e-4"], ["kd.lrr", "kd.lr"]),  # unknown key, with the suggestion
        (["conf=zebra_1b", "--", "kd.lr=-1"], ["kd.lr=-1"]),  # a value validate_config refuses
        (["conf=zebra_1b", "--", "strategy=zero9"], ["zero9", "deepspeed_zero2"]),
        (["conf=zebra_1b", "--", "trainer.devices=4"], ["trainer.devices=4", "SLURM_NTASKS_PER_NODE=8"]),
        (["conf=zebra_1b", "--nodes", "2", "--", "trainer.num_nodes=1"], ["trainer.num_nodes=1", "SLURM_NNODES=2"]),
        (["conf=zebra_1b", "--time", "tomorrow"], ["--time=tomorrow"]),
        (["conf=zebra_1b", "--nodes", "0"], ["--nodes=0"]),
        (["zebra 1b"], ["preset 'zebra 1b'"]),
        (["conf=zebra_1b", "--partition", "gpu a100"], ["--partition='gpu a100'"]),
    ],
)
def test_mistakes_fail_in_one_line_before_sbatch(capsys, fake_sbatch, argv, names):
    assert submit.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("note:")]
    assert len(err) == 1, err
    for name in names:
        assert name in err[0], err[0]
    assert not fake_sbatch.exists()


def test_command_line_one_line_error_for_a_bad_preset(tmp_path):
    """The real entry point in a subprocess: exit 2, one line on stderr, sbatch never run."""
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    (tmp_path / "sbatch").write_text(f"#!/bin/bash\ntouch {tmp_path}/called\n")
    (tmp_path / "sbatch").chmod(0o755)
    result = subprocess.run(
        [sys.executable, "-m", "launch.submit", "conf=tiniest", "--nodes", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: conf='tiniest'"), result.stderr
    assert not (tmp_path / "called").exists()


def test_render_replaces_and_adds_directives():
    template = '#!/bin/bash\n#SBATCH --nodes=1\n#SBATCH --requeue\n#SBATCH --time=1:00:00\n\nexec bash x "$@"\n'
    script = submit.render(template, {"nodes": "4", "partition": "p"}, ["conf=a", "x=1"], Path("/repo dir"))
    assert script.splitlines() == [
        "#!/bin/bash",
        "#SBATCH --nodes=4",
        "#SBATCH --requeue",
        "#SBATCH --time=1:00:00",
        "#SBATCH --partition=p",
        "",
        "export ZEBRA_REPO='/repo dir'",
        "set -- conf=a x=1",
        'exec bash x "$@"',
    ]
