"""Train and evaluate a sequential recommender: `python train.py [group=option ...] [key=value ...]`."""

import hydra
from omegaconf import DictConfig

from seqrec.run import main as run_main


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_main(cfg)  # the validation metric named by `optimized_metric`, for sweepers


if __name__ == "__main__":
    main()
