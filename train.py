"""Train and evaluate a sequential recommender: `python train.py [group=option ...] [key=value ...]`."""

import sys

import hydra
from omegaconf import DictConfig

from seqrec.preflight import missing_launcher
from seqrec.run import main as run_main


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_main(cfg)  # the validation metric named by `optimized_metric`, for sweepers


if __name__ == "__main__":
    if problem := missing_launcher(sys.argv[1:]):
        sys.exit(f"error: {problem}")
    main()
