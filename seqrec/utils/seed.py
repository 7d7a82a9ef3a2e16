"""Seeding: one call seeds Python, NumPy's legacy generator and torch (offset by rank for dropout)."""

import random

import numpy as np
import torch


def seed_everything(seed: int, rank: int = 0) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)
