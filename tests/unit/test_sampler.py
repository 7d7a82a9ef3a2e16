"""Training batches: correct windows, negatives outside the history, determinism, disjoint rank shards."""

import numpy as np
import torch

from seqrec.data.dataset import synthetic
from seqrec.data.windows import eval_windows, train_windows
from seqrec.train.sampler import TrainSampler


def data():
    return synthetic(num_users=200, num_items=150, seed=3)


def test_windows_are_right_aligned_shifted_sequences():
    d = data()
    users = np.array([0, 5, 9])
    w = train_windows(d, users, maxlen=40)
    for row, u in enumerate(users):
        hist = d.user_history(u)
        n = min(len(hist) - 1, 40)
        assert (w.seq[row, -n:] == hist[-n - 1 : -1]).all() and (w.seq[row, :-n] == 0).all()
        assert (w.pos[row, -n:] == hist[-n:]).all()
        assert (w.times[row, -n:] == d.train_times[d.train_ptr[u] : d.train_ptr[u + 1]][-n - 1 : -1]).all()
    test = eval_windows(d, users, "test", maxlen=40)
    for row, u in enumerate(users):
        assert test.seq[row, -1] == d.valid_item[u]
        assert (test.seq[row, -min(len(d.user_history(u)), 39) - 1 : -1] == d.user_history(u)[-39:]).all()


def test_negatives_are_never_in_the_training_history():
    d = data()
    sampler = TrainSampler(d, batch_size=32, maxlen=50, num_negatives=3, seed=0)
    for batch in sampler.epoch(0):
        assert batch.neg.shape == batch.seq.shape + (3,)
        for row in range(batch.seq.shape[0]):
            negs = batch.neg[row][batch.pos[row] > 0].flatten().tolist()
            assert all(n > 0 for n in negs)
            assert (batch.neg[row][batch.pos[row] == 0] == 0).all()
    # exact check against each user's history, through the user order of the global batches
    for users in sampler.global_batches(1):
        b = sampler.make_batch(users, np.random.default_rng(0))
        for row, u in enumerate(users):
            hist = set(d.user_history(u).tolist())
            assert not hist & set(b.neg[row].flatten().tolist()) - {0}


def test_shared_negatives_have_one_row_per_sequence():
    d = data()
    sampler = TrainSampler(d, batch_size=16, maxlen=50, num_negatives=20, shared_negatives=True, seed=0)
    users = sampler.global_batches(0)[0]
    batch = sampler.make_batch(users, np.random.default_rng(0))
    assert batch.neg.shape == (len(users), 20)
    for row, u in enumerate(users):
        assert not set(d.user_history(u).tolist()) & set(batch.neg[row].tolist())


def test_same_seed_and_epoch_give_the_same_batches():
    d = data()
    a = list(TrainSampler(d, batch_size=32, maxlen=50, seed=7).epoch(2))
    b = list(TrainSampler(d, batch_size=32, maxlen=50, seed=7).epoch(2))
    c = list(TrainSampler(d, batch_size=32, maxlen=50, seed=7).epoch(3))
    assert all(torch.equal(x.seq, y.seq) and torch.equal(x.neg, y.neg) for x, y in zip(a, b))
    assert not all(x.seq.shape == y.seq.shape and torch.equal(x.seq, y.seq) for x, y in zip(a, c))


def test_every_trainable_user_once_per_epoch_and_rank_shards_are_disjoint():
    d = data()
    world = 3
    samplers = [TrainSampler(d, batch_size=30, maxlen=50, seed=1, rank=r, world_size=world) for r in range(world)]
    batches = samplers[0].global_batches(0)
    everyone = np.concatenate(batches)
    assert len(everyone) == len(set(everyone.tolist())) == len(samplers[0].users)
    for users in batches:
        shards = [set(users[r::world].tolist()) for r in range(world)]
        assert set.union(*shards) == set(users.tolist())
        assert sum(len(s) for s in shards) == len(users)
    assert all(len(s) == len(samplers[0]) for s in samplers)  # same number of steps on every rank


def test_bucketing_trims_padding_without_dropping_items():
    d = data()
    bucketed = TrainSampler(d, batch_size=20, maxlen=200, seed=0, bucket_by_length=True)
    plain = TrainSampler(d, batch_size=20, maxlen=200, seed=0, bucket_by_length=False)
    tokens = lambda s: sum(int((b.pos > 0).sum()) for b in s.epoch(0))  # noqa: E731
    cells = lambda s: sum(b.seq.numel() for b in s.epoch(0))  # noqa: E731
    assert tokens(bucketed) == tokens(plain)
    assert cells(bucketed) < 0.6 * cells(plain)
