"""`python -m train [conf=<preset>] [overrides]`: compose the config, check it, run the stages.

A thin Hydra entry (lightning-hydra-template style): everything it does lives in `train.pipeline.run`, which tests
call directly. Every failure a user can cause or suffer ends in one line on stderr and an exit code
(docs/reliability.md):

  2        a bad config, teacher or data (config mistakes within seconds, before any model loads)
  3        a non-finite loss stopped a training stage (its last.ckpt holds the weights before it)
  4        a checkpoint could not be written, read or resumed (the previous one is intact)
  128 + N  stopped by signal N (SIGTERM 143, SIGUSR1 138) after writing the current step's checkpoint

HYDRA_FULL_ERROR=1 shows the full traceback instead. Secrets in the environment never reach the logs (train/redact).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from omegaconf import DictConfig, OmegaConf

from train.config import ConfigError, check_output_dir, compose_config, typed_config, validate_config

EXIT_BAD_INPUT = 2
log = logging.getLogger(__name__)


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _one_line(message: str) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and any("Original Traceback" in line for line in lines):
        lines = lines[-1:]  # re-raised from a DataLoader worker: the last line is the original message
    return " ".join(lines)


def _exit(message: str, code: int) -> NoReturn:
    """Print one line on stderr (and into the run's log file), then exit with `code`."""
    from train.runtime.redact import redact

    line = redact(_one_line(message))
    record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:  # the log file only: the console gets the line below
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def _precheck(argv: list[str]) -> None:
    """Compose the config once the way @hydra.main will, so that what Hydra reports as a multi-line error (an
    unknown key or preset, a wrong type, override syntax, a broken interpolation in output_dir) is one line too."""
    if _full_error():
        return
    try:
        from hydra._internal.utils import get_args_parser  # Hydra 1.3's own command line
    except ImportError:
        return
    args = get_args_parser().parse_args(argv)  # bad flags: argparse prints its usage line and exits 2
    if (
        args.help
        or args.hydra_help
        or args.multirun
        or args.shell_completion
        or args.info
        or args.config_path
        or args.config_dir
        or args.experimental_rerun
    ):
        return
    try:
        cfg = compose_config(args.overrides, args.config_name or "train")
        # output_dir is also Hydra's run dir, made (and its .hydra/config.yaml written) before main runs: a file in
        # its place, or a rerun that may not continue what the folder holds, is refused before that.
        check_output_dir(cfg.output_dir)
        from train.runtime.rerun import check_rerun

        check_rerun(typed_config(cfg), Path(cfg.output_dir).absolute())
    except ConfigError as error:
        _exit(f"config error: {error}", EXIT_BAD_INPUT)
    except Exception as error:  # OmegaConf interpolation errors
        from train.config import composition_message

        _exit(f"config error: {composition_message(error, args.overrides)}", EXIT_BAD_INPUT)


def _user_errors() -> dict[type, int]:
    """Exceptions that are the user's to fix or expected on clusters, with their exit codes (others: traceback)."""
    from data.sources import DataSourceError
    from models.teachers import TeacherLoadError
    from train.runtime.faults import FaultError

    return {
        ConfigError: EXIT_BAD_INPUT,
        DataSourceError: EXIT_BAD_INPUT,
        TeacherLoadError: EXIT_BAD_INPUT,
        FaultError: 1,
    }


def _apply_launcher(cfg: DictConfig) -> None:
    """Under srun or torchrun, trainer.devices / trainer.num_nodes follow the allocation (train/runtime/cluster.py);
    values
    given on the command line must match it."""
    from hydra.core.hydra_config import HydraConfig

    from train.runtime.cluster import apply_allocation, override_keys

    apply_allocation(cfg, os.environ, override_keys(HydraConfig.get().overrides.task))


@hydra.main(config_path="../conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        _apply_launcher(cfg)
        typed = validate_config(cfg, fetch_teacher=True)
    except (ConfigError, ValueError) as error:
        if _full_error():
            raise
        _exit(f"config error: {error}", EXIT_BAD_INPUT)
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from train.pipeline import run  # heavy imports only after the config is known to be good
    from train.runtime import redact

    redact.install()
    log.info("resolved config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    errors = tuple(_user_errors().items())
    try:
        run(typed)  # the typed config the stages read
    except SIGTERMException:  # Lightning's own SIGTERM exit (a SystemExit with status 0): the run did not finish
        _exit("stopped by SIGTERM; rerun the same command to resume from the last checkpoint", 128 + signal.SIGTERM)
    except Exception as error:
        code = next((code for kind, code in errors if isinstance(error, kind)), None)
        if code is None or _full_error():
            raise
        _exit(f"error: {error}", getattr(error, "exit_code", code))


if __name__ == "__main__":
    _precheck(sys.argv[1:])
    main()
