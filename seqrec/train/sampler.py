"""Training batches: every user with >= 2 training items once per epoch, negatives outside their history.

Deterministic given (seed, epoch, rank): the user order depends on (seed, epoch) only, so all ranks agree
on the global batches and each takes its own slice; negatives come from a generator seeded with
(seed, epoch, rank). A resumed run therefore sees exactly the batches an unbroken run would have seen.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from seqrec.data.negatives import pair_keys, sample_excluding
from seqrec.data.windows import train_windows, user_time_scale


@dataclass
class Batch:
    """Tensors of one step: seq/pos (B, W), neg (B, W, K) or (B, N) or None, times (B, W), time_scale (B,).

    `loss_weight` rescales the batch's mean loss to a per-target weight that does not depend on the batch's
    length mix (see TrainSampler).
    """

    seq: Tensor
    pos: Tensor | None = None
    neg: Tensor | None = None
    times: Tensor | None = None
    time_scale: Tensor | None = None
    loss_weight: float = 1.0

    def to(self, device: torch.device) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in moved.items()})


def _tensor(a: np.ndarray | None) -> Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


class TrainSampler:
    """Builds shuffled, length-bucketed training batches with vectorised numpy indexing.

    Args:
        data: a `SeqData`.
        batch_size: global batch size; each of `world_size` ranks gets an interleaved slice.
        maxlen: window length L.
        num_negatives: negatives per position (or per sequence when `shared_negatives`); 0 = none.
        shared_negatives: draw (B, N) negatives per sequence instead of (B, W, K) per position.
        seed: run seed.
        bucket_by_length: group users of similar length into batches and trim the padding. Each batch's mean
            loss is then weighted by its share of the epoch's targets: without that, the targets of a batch of
            short sequences would count ~10x more than those of a batch of long ones (random batches weigh
            every target about equally), and validation NDCG@10 after 10 ML-1M epochs dropped 0.066 -> 0.053.
        rank, world_size: this process's shard.
    """

    BUCKET_BATCHES = 32  # users are sorted by length within chunks of this many batches

    def __init__(
        self,
        data,
        *,
        batch_size: int = 128,
        maxlen: int = 200,
        num_negatives: int = 1,
        shared_negatives: bool = False,
        seed: int = 0,
        bucket_by_length: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.data, self.batch_size, self.maxlen = data, batch_size, maxlen
        self.num_negatives, self.shared_negatives = num_negatives, shared_negatives
        self.seed, self.bucket_by_length, self.rank, self.world_size = seed, bucket_by_length, rank, world_size
        lengths = np.diff(data.train_ptr)
        self.users = np.flatnonzero(lengths >= 2)  # one input and one target at least
        self.lengths = np.minimum(lengths - 1, maxlen)
        owners = np.repeat(np.arange(data.num_users), lengths)
        self.history_keys = pair_keys(owners, data.train_items, data.num_items)  # negatives avoid these
        self.time_scale = user_time_scale(data)
        # mean number of targets in one rank's batch, over an epoch
        self.mean_targets = self.lengths[self.users].sum() / max(len(self.global_batches(0)) * world_size, 1)

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches of user indices (identical on every rank)."""
        rng = np.random.default_rng([self.seed, epoch])
        users = rng.permutation(self.users)
        if self.bucket_by_length:
            chunk = self.batch_size * self.BUCKET_BATCHES
            parts = [users[i : i + chunk] for i in range(0, len(users), chunk)]
            users = np.concatenate([p[np.argsort(-self.lengths[p], kind="stable")] for p in parts])
        batches = [users[i : i + self.batch_size] for i in range(0, len(users), self.batch_size)]
        batches = [b for b in batches if len(b) >= self.world_size]  # every rank needs a row
        order = rng.permutation(len(batches)) if self.bucket_by_length else np.arange(len(batches))
        return [batches[i] for i in order]

    def __len__(self) -> int:
        return len(self.global_batches(0))

    def make_batch(self, users: np.ndarray, rng: np.random.Generator) -> Batch:
        w = train_windows(self.data, users, self.maxlen, trim=self.bucket_by_length)
        neg = None
        if self.num_negatives > 0:
            if self.shared_negatives:
                shape = (len(users), self.num_negatives)
            else:
                shape = w.seq.shape + (self.num_negatives,)
            neg = sample_excluding(rng, users, shape, self.data.num_items, self.history_keys)
            if not self.shared_negatives:
                neg *= w.pos[..., None] != 0  # no negatives at padding
        scale = self.time_scale[users] if self.time_scale is not None else None
        weight = float(self.lengths[users].sum() / self.mean_targets) if self.bucket_by_length else 1.0
        return Batch(_tensor(w.seq), _tensor(w.pos), _tensor(neg), _tensor(w.times), _tensor(scale), weight)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """This rank's batches for `epoch`, in order."""
        rng = np.random.default_rng([self.seed, epoch, self.rank, 1])
        for users in self.global_batches(epoch):
            yield self.make_batch(users[self.rank :: self.world_size], rng)


def prefetch(iterator: Iterator[Batch], depth: int = 2) -> Iterator[Batch]:
    """Run `iterator` in a background thread, `depth` items ahead (numpy and torch release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in iterator:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
