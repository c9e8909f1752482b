"""Submit `python -m train` to SLURM after checking its config on the login node.

    python -m launch.submit conf=zebra_1b --nodes 2 --time 24:00:00 [--partition p] [--account a] [--dry-run] \\
        -- kd.lr=1e-4 logger=wandb

The preset and overrides are composed and validated here (train.config, the teacher's Hub config not fetched), and
checked against the allocation asked for (train/runtime/cluster.py), so a typo fails in seconds with one line instead of
after
hours in the queue. Then the sbatch template (launch/zebra_1node.sbatch for one node, zebra_multinode.sbatch for
more) is rendered with the SLURM options and the command's arguments into logs/<preset>-<time>.sbatch, and sbatch
runs it from the current directory (outputs/ and logs/ land there). `--dry-run` prints the script instead.
Exit codes: 0 submitted (or printed), 1 sbatch failed, 2 a bad config or option.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

LAUNCH = Path(__file__).resolve().parent
REPO = LAUNCH.parent
TIME_FORMAT = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")  # sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
EXIT_BAD_INPUT = 2


class SubmitError(ValueError):
    """A mistake in the submit command, with its one-line message."""


def template_for(nodes: int) -> Path:
    return LAUNCH / ("zebra_1node.sbatch" if nodes == 1 else "zebra_multinode.sbatch")


def preset_name(value: str) -> str:
    name = value.removeprefix("conf=")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SubmitError(f"preset {value!r} is invalid: give conf=<name> with <name> from conf/conf/")
    return name


def check_config(preset: str, overrides: Sequence[str], nodes: int, gpus_per_node: int) -> None:
    """Compose and validate the run's config as every rank of the job will, with the allocation it will get."""
    from omegaconf.errors import OmegaConfBaseException

    from train.config import ConfigError, compose_config, composition_message, validate_config
    from train.runtime.cluster import override_keys, resolve_devices, slurm_allocation

    args = [f"conf={preset}", *overrides]
    try:
        cfg = compose_config(args)
        cfg.output_dir  # noqa: B018 -- resolves its interpolations, as Hydra does before the job starts
        env = {
            "SLURM_JOB_ID": "0",
            "SLURM_NTASKS": str(nodes * gpus_per_node),
            "SLURM_NTASKS_PER_NODE": str(gpus_per_node),
            "SLURM_NNODES": str(nodes),
            "SLURM_GPUS_ON_NODE": str(gpus_per_node),
        }
        trainer = cfg.trainer
        alloc = slurm_allocation(env)
        trainer.devices, trainer.num_nodes = resolve_devices(
            trainer.devices, trainer.num_nodes, alloc, str(trainer.accelerator), override_keys(overrides)
        )
        validate_config(cfg, fetch_teacher=False)
    except (ConfigError, ValueError) as error:
        raise SubmitError(f"config error: {error}") from error
    except OmegaConfBaseException as error:  # broken interpolations
        raise SubmitError(f"config error: {composition_message(error, args)}") from error
    if trainer.accelerator == "cpu":
        print(f"note: conf={preset} trains on CPU (trainer.accelerator=cpu); add trainer=gpu for GPUs", file=sys.stderr)
    for key in ("teacher.name_or_path", "kd.teacher_name_or_path"):
        name = cfg.teacher.name_or_path if key.startswith("teacher") else cfg.kd.teacher_name_or_path
        if name and not _in_hub_cache(name):
            print(
                f"note: {key}={name} is not in the local Hugging Face cache; compute nodes run offline "
                f"(HF_HUB_OFFLINE=1): `hf download {name}` first (README, Running on a cluster)",
                file=sys.stderr,
            )


def _in_hub_cache(name: str) -> bool:
    """True for local directories, `tiny`, and Hub models whose config.json is in the HF cache."""
    if name == "tiny" or Path(name).expanduser().exists():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return True  # cannot tell: say nothing
    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def render(template: str, options: Mapping[str, str], args: Sequence[str], repo: Path = REPO) -> str:
    """The template with `#SBATCH --<key>=` lines replaced or added from `options`, and the command's arguments
    (`set -- ...`) and the repository (ZEBRA_REPO, where launch/slurm_job.sh lives) written before its `exec`."""
    lines = template.splitlines()
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH ")]
    if not directives or not any(line.startswith("exec ") for line in lines):
        raise SubmitError("the sbatch template needs #SBATCH lines and an exec line")
    out: list[str] = []
    seen: set[str] = set()
    for i, line in enumerate(lines):
        match = re.match(r"#SBATCH --([\w-]+)=", line)
        if match and match.group(1) in options:
            key = match.group(1)
            line, seen = f"#SBATCH --{key}={options[key]}", seen | {key}
        if line.startswith("exec "):
            out += [f"export ZEBRA_REPO={shlex.quote(str(repo))}", f"set -- {shlex.join(args)}"]
        out.append(line)
        if i == directives[-1]:  # options the template does not have (partition, account)
            out += [f"#SBATCH --{key}={value}" for key, value in options.items() if key not in seen]
    return "\n".join(out) + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch.submit",
        description="Check a run's config, then submit it with sbatch (launch/zebra_*.sbatch).",
        epilog="Example: python -m launch.submit conf=zebra_1b --nodes 2 --time 24:00:00 -- kd.lr=1e-4 logger=wandb",
    )
    parser.add_argument("preset", help="conf=<preset> (conf/conf/<preset>.yaml)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of python -m train (after --)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node = tasks per node (default 8)")
    parser.add_argument("--time", help="time limit, e.g. 24:00:00 or 2-00:00:00 (default: the template's 24:00:00)")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument("--qos", help="SLURM QOS")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores per GPU task (default: the template's 8)")
    parser.add_argument("--job-name", help="SLURM job name (default: the preset); logs go to logs/<job-name>-<id>.out")
    parser.add_argument("--dry-run", action="store_true", help="check and print the script; submit nothing")
    return parser.parse_intermixed_args(argv)


def sbatch_options(args: argparse.Namespace, preset: str) -> dict[str, str]:
    if args.nodes < 1:
        raise SubmitError(f"--nodes={args.nodes} is invalid; allowed: an integer >= 1")
    if args.gpus_per_node < 1:
        raise SubmitError(f"--gpus-per-node={args.gpus_per_node} is invalid; allowed: an integer >= 1")
    if args.time is not None and not TIME_FORMAT.match(args.time):
        raise SubmitError(f"--time={args.time} is invalid; allowed: minutes, HH:MM:SS or D-HH:MM:SS")
    options = {
        "job-name": args.job_name or preset,
        "nodes": str(args.nodes),
        "ntasks-per-node": str(args.gpus_per_node),  # one task per GPU
        "gpus-per-node": str(args.gpus_per_node),
        "time": args.time,
        "cpus-per-task": None if args.cpus_per_task is None else str(args.cpus_per_task),
        "partition": args.partition,
        "account": args.account,
        "qos": args.qos,
    }
    options = {key: value for key, value in options.items() if value is not None}
    for key, value in options.items():
        if not value or any(c.isspace() or c == "#" for c in value):  # one token on an #SBATCH line
            raise SubmitError(f"--{key}={value!r} is invalid; allowed: a value without spaces or '#'")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        preset = preset_name(args.preset)
        options = sbatch_options(args, preset)
        check_config(preset, args.overrides, args.nodes, args.gpus_per_node)
        script = render(template_for(args.nodes).read_text(), options, [f"conf={preset}", *args.overrides])
    except SubmitError as error:
        print(error, file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.dry_run:
        print(script, end="")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        print("sbatch not found: run this on a SLURM login node (or add --dry-run)", file=sys.stderr)
        return 1
    logs = Path("logs")
    logs.mkdir(exist_ok=True)  # --output=logs/%x-%j.out: SLURM does not create the folder
    path = logs / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    result = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"sbatch failed ({result.returncode}): {' '.join(result.stderr.split())}", file=sys.stderr)
        return 1
    job = result.stdout.strip().split(";")[0]
    given = any(o.split("=", 1)[0] in ("output_dir", "run_name") for o in args.overrides)
    outputs = "as given in the overrides" if given else f"outputs/{preset}-{job}"
    print(f"submitted job {job} ({path}): log logs/{options['job-name']}-{job}.out, outputs {outputs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
