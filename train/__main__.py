"""`python -m train [conf=<preset>] [overrides]`: compose the config, check it, run the stages.

A thin Hydra entry (lightning-hydra-template style): everything it does lives in `train.pipeline.run`,
which tests call directly. Config errors end in one line naming the key (full traceback with
HYDRA_FULL_ERROR=1).
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from train.config import ConfigError, validate_config


@hydra.main(config_path="../conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        validate_config(cfg)
    except (ConfigError, ValueError) as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(2)
    from train.pipeline import run  # heavy imports only after the config is known to be good

    logging.getLogger(__name__).info("resolved config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    run(cfg)


if __name__ == "__main__":
    main()
