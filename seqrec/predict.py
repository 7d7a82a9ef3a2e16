"""Top-k next-item recommendations from a finished run, as CSV.

    python -m seqrec.predict outputs/runs/2025-01-01/10-00-00 [--users 1 2 3 | --all] [--k 10] [--out recs.csv]

The data and model are rebuilt from the run's `.hydra/config.yaml` (run it from the directory training ran in,
so relative dataset paths resolve) and the weights come from `checkpoints/best.pt`, the validation-selected
checkpoint. Each user's whole known sequence (training items, then the validation and test items) is the input;
items the user has already interacted with are never recommended. Columns: user, rank, item, score (the model's
logit) and, where the dataset has titles, title. User and item ids are the dataset's original ids.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from seqrec.errors import SeqrecError

log = logging.getLogger(__name__)


class PredictError(SeqrecError):
    """A user error: reported as one line, exit status 1."""


def load_run(run_dir: str | Path, checkpoint: str = "best"):
    """(data, model in eval mode, config) rebuilt from a run directory."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from seqrec.train.checkpoint import load_checkpoint

    run = Path(run_dir)
    if not run.is_dir():
        raise PredictError(f"{run_dir}: no such directory")
    config_path = run / ".hydra" / "config.yaml"
    if not config_path.is_file():
        raise PredictError(f"{run_dir}: not a run directory (no .hydra/config.yaml)")
    ckpt = Path(checkpoint) if checkpoint not in ("best", "last") else run / "checkpoints" / f"{checkpoint}.pt"
    if not ckpt.is_file():
        hint = " (has the run finished an evaluation? try --checkpoint last)" if checkpoint == "best" else ""
        raise PredictError(f"{ckpt}: checkpoint not found{hint}")
    cfg = OmegaConf.load(config_path)
    try:
        data = instantiate(cfg.dataset)
        model = instantiate(cfg.model, num_items=data.num_items)
    except SeqrecError:
        raise
    except Exception as e:  # noqa: BLE001 - instantiate wraps the real cause
        raise PredictError(f"{config_path}: cannot rebuild the data/model ({str(e).splitlines()[0][:200]})") from None
    state = load_checkpoint(ckpt)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise PredictError(
            f"{ckpt}: does not fit the model/data of {config_path} ({str(e).splitlines()[0][:160]})"
        ) from None
    model.eval()
    return data, model, cfg


def full_windows(data, users: np.ndarray, maxlen: int) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray]]:
    """Right-aligned windows over each user's whole known sequence (train + valid + test items).

    Returns:
        (seq (B, W), times (B, W) or None, per-user arrays of every item the user has interacted with).
    """
    histories, time_rows = [], []
    for u in users:
        items = [data.user_history(u)]
        times = [data.train_times[data.train_ptr[u] : data.train_ptr[u + 1]]] if data.has_time else []
        for item, t in ((data.valid_item, data.valid_time), (data.test_item, data.test_time)):
            if item[u] > 0:
                items.append(item[u : u + 1])
                if data.has_time:
                    times.append(t[u : u + 1])
        histories.append(np.concatenate(items))
        if data.has_time:
            time_rows.append(np.concatenate(times))
    width = max(1, min(maxlen, max(len(h) for h in histories)))
    seq = np.zeros((len(users), width), dtype=np.int64)
    tim = np.zeros((len(users), width), dtype=np.int64) if data.has_time else None
    for row, h in enumerate(histories):
        tail = h[-width:]
        seq[row, width - len(tail) :] = tail
        if tim is not None:
            t = time_rows[row][-width:]
            tim[row, width - len(t) :] = t
    return seq, tim, histories


@torch.no_grad()
def recommend(
    data, model, users: np.ndarray, k: int = 10, maxlen: int = 200, batch_size: int = 256, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k unseen items per user.

    Args:
        users: (B,) internal user indices 0..U-1.

    Returns:
        (items (B, k) internal item ids 1..I, scores (B, k)), best first.
    """
    from seqrec.data.windows import user_time_scale

    model = model.to(device)
    scale_all = user_time_scale(data)
    k = min(k, data.num_items)
    out_items = np.zeros((len(users), k), dtype=np.int64)
    out_scores = np.zeros((len(users), k), dtype=np.float32)
    for start in range(0, len(users), batch_size):
        u = users[start : start + batch_size]
        seq, times, histories = full_windows(data, u, maxlen)
        t_seq = torch.from_numpy(seq).to(device)
        t_times = torch.from_numpy(times).to(device) if times is not None else None
        scale = torch.from_numpy(scale_all[u]).to(device) if scale_all is not None else None
        h = model(t_seq, t_times, scale)[:, -1].float()  # (b, D): the prediction after the last known item
        scores = model.head.score_all(h)  # (b, I): items 1..I
        rows = np.repeat(np.arange(len(u)), [len(x) for x in histories])
        seen = np.concatenate(histories) - 1
        scores[torch.from_numpy(rows).to(device), torch.from_numpy(seen).to(device)] = -torch.inf
        top = torch.topk(scores, k, dim=1)
        out_items[start : start + len(u)] = top.indices.cpu().numpy() + 1
        out_scores[start : start + len(u)] = top.values.cpu().numpy()
    return out_items, out_scores


def resolve_users(data, requested: list[str] | None) -> np.ndarray:
    """Internal indices of the requested original user ids (all users if None)."""
    if requested is None:
        return np.arange(data.num_users, dtype=np.int64)
    index = {str(uid): i for i, uid in enumerate(data.user_ids.tolist())}
    unknown = [u for u in requested if str(u) not in index]
    if unknown:
        raise PredictError(
            f"unknown user id{'s' * (len(unknown) > 1)}: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''} (dataset '{data.name}' has {data.num_users} users, "
            f"e.g. {', '.join(str(x) for x in data.user_ids[:3].tolist())})"
        )
    return np.array([index[str(u)] for u in requested], dtype=np.int64)


def write_csv(data, users: np.ndarray, items: np.ndarray, scores: np.ndarray, out) -> int:
    titles = data.item_titles
    header = ["user", "rank", "item", "score"] + (["title"] if titles is not None else [])
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    n = 0
    for row, u in enumerate(users):
        for rank, (item, score) in enumerate(zip(items[row], scores[row], strict=False), 1):
            if not np.isfinite(score):  # fewer unseen items than k
                continue
            line = [_plain(data.user_ids[u]), rank, _plain(data.item_ids[item]), f"{score:.4f}"]
            if titles is not None:
                line.append(str(titles[item]))
            writer.writerow(line)
            n += 1
    return n


def _plain(x):
    return x.item() if isinstance(x, np.generic) else x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqrec.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory (outputs/runs/... or one job of a sweep)")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--users", nargs="+", metavar="ID", help="original user ids (default: all users)")
    who.add_argument("--all", action="store_true", help="every user (the default)")
    parser.add_argument("--k", type=int, default=10, help="recommendations per user (default 10)")
    parser.add_argument("--out", default=None, help="CSV file (default <run_dir>/predictions.csv; - for stdout)")
    parser.add_argument("--checkpoint", default="best", help="best (default), last, or a path to a .pt file")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--batch-size", type=int, default=256, help="users per forward pass")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.k < 1:
            raise PredictError(f"--k must be >= 1, got {args.k}")
        data, model, cfg = load_run(args.run_dir, args.checkpoint)
        users = resolve_users(data, args.users)
        items, scores = recommend(
            data, model, users, args.k, maxlen=int(cfg.model.maxlen), batch_size=args.batch_size, device=args.device
        )
        if args.out == "-":
            write_csv(data, users, items, scores, sys.stdout)
            return 0
        out = Path(args.out) if args.out else Path(args.run_dir) / "predictions.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as f:
            n = write_csv(data, users, items, scores, f)
        print(f"wrote {n} recommendations for {len(users)} users to {out}", file=sys.stderr)
    except SeqrecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
