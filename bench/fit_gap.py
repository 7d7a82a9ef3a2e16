"""How much better a finished model predicts targets it trained on than unseen ones (a memorisation check).

    python bench/fit_gap.py RUN_DIR [RUN_DIR ...] [--users 1500] [--seed 0] [--out outputs/fit_gap.json]

For a sample of users, the validation-selected checkpoint (`checkpoints/best.pt`, loaded as `seqrec.predict` does:
weights only, verified) scores, in eval mode (no dropout):
- seen: each user's last training item, from the training items before it (a target the model was trained on,
  in the same right-aligned window it saw during training);
- unseen: the user's validation item, from all the training items (what validation scores).
Both are full rankings over every item, without filtering seen items, so the two rows count the same competitors.
The two targets are adjacent in time, so a drift in taste explains little of a gap between them; a large gap says
the model fits the pairs it trained on better than it generalises, and a regulariser may help (more dropout,
label smoothing, weight decay). Run from the directory training ran in, so relative dataset paths resolve.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqrec.data.windows import Windows, eval_windows, train_windows, user_time_scale  # noqa: E402
from seqrec.predict import load_run  # noqa: E402


def seen_and_unseen_inputs(data, users: np.ndarray, width: int) -> dict[str, Windows]:
    """The model inputs of both rows, built as training and validation build them: "seen" is the training
    sampler's last window of each user (its final target is the last training item), "unseen" validation's input."""
    return {
        "seen": train_windows(data, users, width, trim=False),
        "unseen": eval_windows(data, users, "valid", width, trim=False),
    }


@torch.no_grad()
def target_fit(model, data, users: np.ndarray, windows: Windows, targets: np.ndarray, batch: int = 256) -> dict:
    """Mean cross-entropy, NDCG@10 and HR@10 of `targets` (B,) after the last slot of `windows` (B, W), full
    ranking, unfiltered."""
    scale_all = user_time_scale(data)  # (U,) TiSASRec's per-user time unit, None without timestamps
    losses, ranks = [], []
    for start in range(0, len(users), batch):
        rows = slice(start, start + batch)
        seq = torch.from_numpy(windows.seq[rows])
        times = torch.from_numpy(windows.times[rows]) if windows.times is not None else None
        scale = torch.from_numpy(scale_all[users[rows]]) if scale_all is not None else None
        h = model(seq, times, scale)[:, -1].float()  # (b, D)
        scores = model.head.score_all(h)  # (b, I): column j is item j + 1
        target = torch.from_numpy(targets[rows]) - 1  # (b,)
        losses.append(F.cross_entropy(scores, target, reduction="none"))
        ranks.append((scores >= scores.gather(1, target[:, None])).sum(1) - 1)  # pessimistic, 0-based
    loss, rank = torch.cat(losses), torch.cat(ranks).double()
    hit = rank < 10
    return {
        "ce": loss.mean().item(),
        "ndcg@10": (hit / torch.log2(rank + 2)).mean().item(),
        "hr@10": hit.double().mean().item(),
    }


def fit_gap(run_dir: str, users: int, seed: int) -> dict:
    data, model, cfg = load_run(run_dir)
    width = int(cfg["model"]["maxlen"])
    lengths = np.diff(data.train_ptr)
    candidates = np.flatnonzero((lengths >= 2) & (data.valid_item > 0))
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(candidates, min(users, len(candidates)), replace=False))
    inputs = seen_and_unseen_inputs(data, chosen, width)
    last_train = data.train_items[data.train_ptr[chosen + 1] - 1].astype(np.int64)
    seen = target_fit(model, data, chosen, inputs["seen"], last_train)
    unseen = target_fit(model, data, chosen, inputs["unseen"], data.valid_item[chosen].astype(np.int64))
    return {"run": str(run_dir), "users": len(chosen), "seen": seen, "unseen": unseen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories with checkpoints/best.pt")
    parser.add_argument("--users", type=int, default=1500, help="users sampled per run (default 1500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the user sample (the same users in every run)")
    parser.add_argument("--out", default="outputs/fit_gap.json", help="JSON written here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = [fit_gap(run, args.users, args.seed) for run in args.runs]
    print(f"{'run':<60} {'users':>5} {'CE seen':>8} {'CE unseen':>9} {'gap':>6} {'HR@10 seen':>10} {'unseen':>7}")
    for r in rows:
        s, u = r["seen"], r["unseen"]
        print(
            f"{r['run'][-60:]:<60} {r['users']:>5} {s['ce']:>8.3f} {u['ce']:>9.3f} {u['ce'] - s['ce']:>6.3f} "
            f"{s['hr@10']:>10.4f} {u['hr@10']:>7.4f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
