"""Leave-one-out evaluation under the full-ranking and the sampled protocol (docs/MODELS.md, section 7).

Full: the target is ranked against every item; items the user has already seen as input are excluded
(except the target itself, should it be a repeat). Sampled: against `num_negatives` items the user never
interacted with, drawn once per (seed, split) and cached, so every epoch and every model faces the same
candidates. Users are processed in length-sorted, trimmed batches and sharded across ranks; the metric sums
are all-reduced, so a sharded evaluation gives exactly the single-process numbers.

Full ranking streams the catalogue in blocks of at most `item_chunk` items (on a CPU, blocks of at most
`_CPU_BLOCK_SCORES` scores, which stay in cache): each block's scores are compared with the target's and counted,
so memory is O(users per batch x item_chunk) whatever the catalogue size, and no sort or top-k over all items is
ever made. A user whose count reaches max(ks) is done: every metric is 0 from there on. The blocks' matmul is only
a filter: competitors within its rounding error of the target are rescored by the routine that scored the target
(`count_at_least`), so the ranks are exact whatever the block shapes, threads or BLAS.
`valid_users` evaluates validation on a fixed sample of users (the same every epoch, drawn once per seed); test
always ranks every user, and keeps each user's rank for `write_test_ranks` (seqrec.eval.user_ranks).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from seqrec.data.negatives import sample_excluding
from seqrec.data.windows import eval_windows, user_time_scale
from seqrec.eval.metrics import count_at_least, metric_sums, rank_of_target
from seqrec.eval.user_ranks import write_test_ranks
from seqrec.utils.rules import NON_NEGATIVE, POSITIVE, SEED, Rule, one_of

SPLITS = ("valid", "test")
log = logging.getLogger(__name__)
KEY_PREFIX = {"valid": "val", "test": "test"}  # metric keys: val/ndcg@10, test/hr@10, val_sampled/ndcg@10
# On a CPU a full-ranking block holds at most this many scores (2 MB of float32), whatever eval.item_chunk allows:
# the matmul writes the block and the comparison reads it back while it is still in the core's cache. Measured on
# 729,000 items x 64 dims, 1 thread: 512 users x 1024 items took 1.6 ns per score for the matmul and the count,
# 512 x 8192 2.0-2.2 ns; on the full-ranking evaluation 2.1-2.4 s against 2.8 s (3,000 users, 30 % hits).
_CPU_BLOCK_SCORES = 1 << 19


class Evaluator:
    """Computes NDCG / HR / MRR at `ks` for the validation or test targets.

    Args:
        data: a `SeqData`.
        protocol: "full" or "sampled".
        num_negatives: negatives per user for the sampled protocol.
        ks: cut-offs.
        also_sampled: with protocol=full, also report sampled metrics (under `<split>_sampled/`).
        filter_seen: exclude already-seen items from the full ranking.
        batch_size: users per forward pass.
        maxlen: the model's window length.
        seed: fixes the sampled negatives and the validation user sample.
        valid_users: validate on this many users, a sample drawn once per seed; 0 = every user. Test is always
            on every user.
        item_chunk: items scored at a time in full ranking (memory is batch_size x item_chunk floats).
        rank, world_size: shard of users for this process.
    """

    RULES = {
        "protocol": one_of("full", "sampled"),
        "num_negatives": POSITIVE,
        "ks": Rule(
            lambda v: len(v) > 0 and all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in v),
            "must be a non-empty list of positive ints",
        ),
        "batch_size": POSITIVE,
        "maxlen": POSITIVE,
        "seed": SEED,
        "valid_users": NON_NEGATIVE,
        "item_chunk": POSITIVE,
    }

    def __init__(
        self,
        data,
        *,
        protocol: str = "full",
        num_negatives: int = 100,
        ks: list[int] = (5, 10, 20),
        also_sampled: bool = False,
        filter_seen: bool = True,
        batch_size: int = 512,
        maxlen: int = 200,
        seed: int = 0,
        valid_users: int = 0,
        item_chunk: int = 8192,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.data, self.protocol, self.num_negatives, self.ks = data, protocol, num_negatives, list(ks)
        self.also_sampled, self.filter_seen = also_sampled, filter_seen
        self.batch_size, self.maxlen, self.seed = batch_size, maxlen, seed
        self.valid_users, self.item_chunk = valid_users, item_chunk
        self.rank, self.world_size = rank, world_size
        self.time_scale = user_time_scale(data)
        if protocol == "full" and max(self.ks) >= data.num_items:  # every item is in the top k: hr@k is 1
            log.warning("eval.ks=%s: k >= the %d items of %s, so hr@k = 1 there", self.ks, data.num_items, data.name)
        self._negatives: dict[str, np.ndarray] = {}
        self.test_ranks: tuple[np.ndarray, np.ndarray] | None = None  # (users, ranks) of the last test evaluation
        self._largest_item = None

    @property
    def needs_sampled(self) -> bool:
        return self.protocol == "sampled" or self.also_sampled

    def users(self, split: str) -> np.ndarray:
        """Evaluated users of `split`, length-sorted so batches trim well."""
        target = self.data.valid_item if split == "valid" else self.data.test_item
        users = np.flatnonzero(target > 0)
        if split == "valid" and 0 < self.valid_users < len(users):
            # the same sample every epoch and on every rank: it depends on the seed only
            users = np.sort(np.random.default_rng([self.seed, 0, 13]).choice(users, self.valid_users, replace=False))
        return users[np.argsort(np.diff(self.data.train_ptr)[users], kind="stable")]

    def negatives(self, split: str) -> np.ndarray:
        """(U, num_negatives) sampled-protocol negatives for every user (0 rows for unevaluated users)."""
        if split not in self._negatives:
            d = self.data
            rng = np.random.default_rng([self.seed, SPLITS.index(split), 7])
            excluded = d.all_item_sets_sorted_keys()  # train ∪ valid ∪ test (TiSASRec's rule)
            self._negatives[split] = sample_excluding(
                rng, np.arange(d.num_users), (d.num_users, self.num_negatives), d.num_items, excluded
            )
        return self._negatives[split]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str, device: torch.device | str = "cpu") -> dict[str, float]:
        """Means over evaluated users, keyed "val/ndcg@10" (primary protocol), "val_sampled/ndcg@10" (also_sampled)."""
        was_training = model.training
        model.eval()
        self._largest_item = None  # the item table's largest row, found by the first full-ranking batch
        users = self.users(split)[self.rank :: self.world_size]
        target = torch.from_numpy(self.data.valid_item if split == "valid" else self.data.test_item)
        sums: dict[str, Tensor] = {}
        test_ranks = []  # (b,) per batch: the primary protocol's ranks of the test targets
        for start in range(0, len(users), self.batch_size):
            u = users[start : start + self.batch_size]
            h = self._last_hidden(model, u, split, device)  # (b, D)
            tgt = target[u].to(device)
            ranks_per_protocol = self._ranks(model, h, u, tgt, split)
            for prefix, ranks in zip(self._prefixes(split), ranks_per_protocol):
                for name, value in metric_sums(ranks, self.ks).items():
                    key = prefix + name
                    sums[key] = sums.get(key, 0) + value.cpu()
            if split == "test":
                test_ranks.append(ranks_per_protocol[0].cpu())
        names = [
            prefix + n
            for prefix in self._prefixes(split)
            for k in self.ks
            for n in (f"ndcg@{k}", f"hr@{k}", f"mrr@{k}")
        ]
        totals = torch.tensor([float(sums.get(n, 0.0)) for n in names] + [float(len(users))], dtype=torch.float64)
        if self.world_size > 1 and dist.is_initialized():
            totals = totals.to(device)
            dist.all_reduce(totals)
            totals = totals.cpu()
        if split == "test":
            self.test_ranks = self._gather_ranks(split, test_ranks, device)
        model.train(was_training)
        count = max(totals[-1].item(), 1.0)
        return {n: totals[i].item() / count for i, n in enumerate(names)}

    def _gather_ranks(self, split: str, parts: list[Tensor], device) -> tuple[np.ndarray, np.ndarray]:
        """(users, their ranks) over every rank's shard, in `users(split)` order: each process fills its own strided
        slots, and a sum over processes fills them all (the shards are disjoint). Full-ranking ranks are capped at
        max(ks), where `_full_ranks` stops counting (past it, how far it counted depends on the item blocks)."""
        users = self.users(split)
        ranks = torch.zeros(len(users), dtype=torch.int64)
        ranks[self.rank :: self.world_size] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        if self.protocol == "full":
            ranks = ranks.clamp(max=max(self.ks))
        if self.world_size > 1 and dist.is_initialized():
            ranks = ranks.to(device)
            dist.all_reduce(ranks)
            ranks = ranks.cpu()
        return users, ranks.numpy()

    def write_test_ranks(self, run_dir: Path) -> None:
        """Write the last test evaluation's per-user ranks to `run_dir/test_ranks.npy` (process 0 only)."""
        if self.rank == 0 and self.test_ranks is not None:
            write_test_ranks(run_dir, *self.test_ranks)

    def _prefixes(self, split: str) -> list[str]:
        key = KEY_PREFIX[split]
        if self.protocol == "sampled" or not self.also_sampled:
            return [key + "/"]
        return [key + "/", key + "_sampled/"]

    def _last_hidden(self, model, users: np.ndarray, split: str, device) -> Tensor:
        w = eval_windows(self.data, users, split, self.maxlen)
        seq = torch.from_numpy(w.seq).to(device)
        times = torch.from_numpy(w.times).to(device) if w.times is not None else None
        scale = torch.from_numpy(self.time_scale[users]).to(device) if self.time_scale is not None else None
        return model(seq, times, scale)[:, -1].float()  # (b, D): the prediction after the last input

    def _ranks(self, model, h: Tensor, users: np.ndarray, target: Tensor, split: str) -> list[Tensor]:
        """Pessimistic 0-based target ranks, one (b,) tensor per protocol in `_prefixes` order."""
        out = []
        target_scores = model.head.score_one(h, target)  # (b,)
        if self.protocol == "full":
            out.append(self._full_ranks(model.head, h, users, target, target_scores, split))
        if self.needs_sampled:
            cand = torch.from_numpy(self.negatives(split)[users]).to(h.device)  # (b, n)
            neg_scores = model.head.score(h, cand)  # (b, n)
            out.append(rank_of_target(neg_scores, target_scores))
        return out

    def _full_ranks(self, head, h: Tensor, users: np.ndarray, target: Tensor, target_scores: Tensor, split: str):
        """(b,) pessimistic ranks against every item, capped at max(ks): the catalogue is scored in blocks of
        `item_chunk` items (wider once users have left, the same batch x item_chunk scores), and a user leaves the
        loop once max(ks) competitors beat its target.

        Every metric is 0 at a rank >= max(ks), so the cap changes no reported number; below it the rank is the
        number of competitors j (the target and, with filter_seen, the seen items left out) with
        head.score_one(h, j) >= head.score_one(h, target): every item scored by the routine that scores the
        target. The blocks are scored by one matmul each, whose rounding depends on the BLAS kernel a block's shape
        selects (MKL rounds a product of 1-3 rows, or of an odd number of rows on 2 threads, differently from
        the whole batch's); a competitor within the matmul's error bound of the target is rescored with
        score_one (`count_at_least`), so the ranks depend on neither block sizes, nor threads, nor the BLAS.
        """
        weight, bias = head.linear()  # (I, D), (I,) or None
        weight = weight.to(h.dtype)
        cap = max(self.ks)
        if self._largest_item is None:  # once per evaluate(): the table does not change during it
            self._largest_item = _largest_item(weight, bias)
        tolerance = _matmul_error_bound(h, *self._largest_item)  # (b,)
        excluded_rows, excluded_cols = self._excluded(users, target, split)  # sorted by column
        excluded_until = excluded_cols.cpu().numpy()  # to find each block's slice without a tensor per block
        ranks = torch.zeros(len(users), dtype=torch.int64, device=h.device)
        active = torch.arange(len(users), device=h.device)  # users whose rank is still below the cap
        slot = torch.arange(len(users), device=h.device)  # a user's row in the active block
        budget = len(users) * self.item_chunk  # scores per block
        if h.device.type == "cpu":  # a block that stays in the core's cache (see _CPU_BLOCK_SCORES)
            budget = min(budget, _CPU_BLOCK_SCORES)
        scores_buffer = torch.empty(budget, dtype=h.dtype, device=h.device)  # reused by every block
        start = 0
        while start < weight.shape[0] and len(active):
            # fewer users left: a wider block keeps the products large and the loop short, at the same memory
            stop = min(start + max(1, budget // len(active)), weight.shape[0])
            h_active = h[active]  # (a, D)
            scores = scores_buffer[: len(active) * (stop - start)].view(len(active), stop - start)
            torch.matmul(h_active, weight[start:stop].T, out=scores)  # (a, c)
            if bias is not None:
                scores += bias[start:stop]
            lo, hi = np.searchsorted(excluded_until, [start, stop]).tolist()
            rows, cols = excluded_rows[lo:hi], excluded_cols[lo:hi]
            live = slot[rows] >= 0
            scores[slot[rows[live]], cols[live] - start] = -torch.inf

            def rescore(r: Tensor, c: Tensor, h_active=h_active, start=start) -> Tensor:
                return head.score_one(h_active[r], c + start + 1)  # column j is item j + 1

            room = cap - ranks[active]
            ranks[active] += count_at_least(scores, target_scores[active], tolerance[active], room, rescore)
            still = ranks[active] < cap
            if not still.all():
                slot[active[~still]] = -1
                active = active[still]
                slot[active] = torch.arange(len(active), device=h.device)
            start = stop
        return ranks

    def _excluded(self, users: np.ndarray, target: Tensor, split: str) -> tuple[Tensor, Tensor]:
        """(row, column) pairs left out of the full ranking, sorted by column: each user's target (it is not its
        own competitor) and, with filter_seen, the items it has seen."""
        rows = torch.arange(len(users), device=target.device)
        excluded_rows, excluded_cols = rows, target - 1
        if self.filter_seen:
            r, items = self._seen(users, split)
            excluded_rows = torch.cat([rows, r.to(target.device)])
            excluded_cols = torch.cat([excluded_cols, items.to(target.device) - 1])
        order = torch.argsort(excluded_cols)  # by column, so each block takes one contiguous slice
        return excluded_rows[order], excluded_cols[order]

    def _seen(self, users: np.ndarray, split: str) -> tuple[Tensor, Tensor]:
        """Row/item pairs the batch's users have seen as input (train items, + the valid item for test)."""
        d = self.data
        starts, ends = d.train_ptr[users], d.train_ptr[users + 1]
        lengths = ends - starts
        rows = np.repeat(np.arange(len(users)), lengths)
        idx = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths) + np.repeat(starts, lengths)
        items = d.train_items[idx]
        if split == "test":
            rows = np.concatenate([rows, np.arange(len(users))])
            items = np.concatenate([items, d.valid_item[users]])
        target = (d.valid_item if split == "valid" else d.test_item)[users]
        keep = items != target[rows]  # a repeated target stays rankable
        return torch.from_numpy(rows[keep]), torch.from_numpy(items[keep])


def _largest_item(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | float]:
    """(the largest norm of an item row, the largest |bias|) of the (I, D) table and (I,) bias."""
    largest_row = weight.norm(dim=-1).max() if len(weight) else weight.new_zeros(())
    largest_bias = bias.abs().max() if bias is not None and len(bias) else 0.0
    return largest_row, largest_bias


def _matmul_error_bound(h: Tensor, largest_row: Tensor, largest_bias: Tensor | float) -> Tensor:
    """(b,) a bound on |matmul score - score_one score| for any item, per hidden state of h (b, D), given the
    largest item row norm and |bias| (`_largest_item`).

    Both are floating-point evaluations of h . w_j + b_j (D products, D - 1 sums, one bias add), each within
    gamma(D + 1) * (|h| |w_j| + |b_j|) of the exact value whatever the order of the sums (gamma(n) = n u / (1 - n u),
    u the unit roundoff), so they differ by at most twice that; the bound is doubled again for the rounding of the
    norms. u is float32's 2**-24 when matmuls run in full float32, bfloat16's 2**-8 when torch may use TF32 or
    bfloat16 for them (`torch.set_float32_matmul_precision`), which only makes more near-ties rescored.
    """
    full_precision = torch.get_float32_matmul_precision() == "highest" and not (
        h.is_cuda and torch.backends.cuda.matmul.allow_tf32
    )
    unit = 2.0**-24 if h.dtype == torch.float32 and full_precision else 2.0**-8
    n = h.shape[-1] + 1
    gamma = n * unit / (1 - n * unit)
    return 4 * gamma * (h.norm(dim=-1) * largest_row + largest_bias)
