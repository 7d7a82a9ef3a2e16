"""Train and evaluate a sequential recommender: `python train.py [group=option ...] [key=value ...]`."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from seqrec.preflight import missing_launcher
from seqrec.run import main as run_main
from seqrec.utils.config import composition_problem

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_main(cfg)  # the validation metric named by `optimized_metric`, for sweepers


if __name__ == "__main__":
    if problem := missing_launcher(sys.argv[1:]) or composition_problem(sys.argv[1:], str(CONF)):
        sys.exit(f"error: {problem}")
    main()
