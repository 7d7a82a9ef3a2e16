"""Training batches: correct windows, negatives outside the history, determinism, disjoint rank shards."""

import numpy as np
import pytest
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
    # exact check against each user's history, through the window order of the global batches
    for windows in sampler.global_batches(1):
        b = sampler.make_batch(windows, np.random.default_rng(0))
        for row, u in enumerate(sampler.window_user[windows]):
            hist = set(d.user_history(u).tolist())
            assert not hist & set(b.neg[row].flatten().tolist()) - {0}


def test_shared_negatives_have_one_row_per_sequence():
    d = data()
    sampler = TrainSampler(d, batch_size=16, maxlen=50, num_negatives=20, shared_negatives=True, seed=0)
    windows = sampler.global_batches(0)[0]
    batch = sampler.make_batch(windows, np.random.default_rng(0))
    assert batch.neg.shape == (len(windows), 20)
    for row, u in enumerate(sampler.window_user[windows]):
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
    assert len(everyone) == len(set(everyone.tolist())) == len(samplers[0].window_user)
    trainable = np.flatnonzero(np.diff(d.train_ptr) >= 2)
    assert sorted(samplers[0].window_user[everyone].tolist()) == trainable.tolist()  # history="last": 1 per user
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


@pytest.mark.parametrize("shared", [False, True])
def test_length_buckets_round_widths_up_and_keep_the_batches_and_negatives(shared):
    d = data()
    kw = dict(batch_size=20, maxlen=50, num_negatives=3, shared_negatives=shared, seed=0)
    trimmed, bucketed = TrainSampler(d, **kw), TrainSampler(d, length_buckets=4, **kw)
    assert bucketed.widths.tolist() == [13, 25, 38, 50]  # ceil(k * 50 / 4)
    widths = set()
    for a, b in zip(trimmed.epoch(0), bucketed.epoch(0), strict=True):
        width, wide = a.seq.shape[1], b.seq.shape[1]
        assert wide == min(w for w in (13, 25, 38, 50) if w >= width)
        widths.add(wide)
        for name in ("seq", "pos", "times") + (() if shared else ("neg",)):
            x, y = getattr(a, name), getattr(b, name)
            assert torch.equal(y[:, wide - width :], x) and not y[:, : wide - width].any(), name  # left padding only
        if shared:
            assert torch.equal(a.neg, b.neg)
        assert a.loss_weight == b.loss_weight and torch.equal(a.time_scale, b.time_scale)
    assert len(widths) <= 4
    assert TrainSampler(d, **kw).widths.size == 0  # 0: off


def _targets_by_user(sampler, epoch):
    """{user: [(window end, inputs, targets)]} over one epoch's batches, padding removed."""
    got = {}
    rng = np.random.default_rng(0)
    for windows in sampler.global_batches(epoch):
        b = sampler.make_batch(windows, rng)
        for row, wi in enumerate(windows):
            real = b.pos[row] > 0
            got.setdefault(int(sampler.window_user[wi]), []).append(
                (int(sampler.window_end[wi]), b.seq[row][real].numpy(), b.pos[row][real].numpy())
            )
    return got


def test_history_all_trains_on_every_target_once_in_windows_of_at_most_maxlen():
    d = synthetic(num_users=60, num_items=150, seed=3, mean_length=40, max_length=120)
    maxlen = 16
    sampler = TrainSampler(d, batch_size=8, maxlen=maxlen, num_negatives=2, seed=0, history="all")
    lengths = np.diff(d.train_ptr)
    assert (lengths - 1 > 2 * maxlen).any()  # some users need three windows or more
    got = _targets_by_user(sampler, epoch=0)
    for u, windows in got.items():
        hist = d.user_history(u)
        windows.sort(key=lambda w: w[0])  # oldest first
        assert all(len(w[2]) <= maxlen for w in windows)
        assert all(len(w[2]) == maxlen for w in windows[1:])  # only the oldest window may be shorter
        # the windows tile the history: each target once, each input the item just before its target
        assert np.array_equal(np.concatenate([w[2] for w in windows]), hist[1:])
        assert np.array_equal(np.concatenate([w[1] for w in windows]), hist[:-1])
    assert sorted(got) == np.flatnonzero(lengths >= 2).tolist()
    # the newest window is exactly history="last"'s window
    last = _targets_by_user(TrainSampler(d, batch_size=8, maxlen=maxlen, seed=0), epoch=0)
    for u, (window,) in last.items():
        newest = max(got[u], key=lambda w: w[0])
        assert np.array_equal(window[1], newest[1]) and np.array_equal(window[2], newest[2])


def test_history_all_weights_every_target_equally_and_rejects_unknown_values():
    d = synthetic(num_users=60, num_items=150, seed=3, mean_length=40, max_length=120)
    sampler = TrainSampler(d, batch_size=8, maxlen=16, seed=0, history="all")
    batches = list(sampler.epoch(0))
    # loss weight = the batch's share of the epoch's targets x number of batches: it sums to the batch count
    assert np.isclose(sum(b.loss_weight for b in batches), len(batches))
    for b in batches:
        assert np.isclose(b.loss_weight, int((b.pos > 0).sum()) / sampler.mean_targets)
    with pytest.raises(ValueError, match="sampler.history='every'"):
        TrainSampler(d, batch_size=8, maxlen=16, history="every")


@pytest.mark.parametrize("rank", [0, 1])
def test_an_epoch_restarted_at_batch_k_continues_with_the_same_batches_without_building_the_first_k(rank):
    d = data()
    sampler = TrainSampler(d, batch_size=16, maxlen=50, num_negatives=2, seed=5, rank=rank, world_size=2)
    whole = list(sampler.epoch(3))
    k = 4
    built = []
    make_batch = sampler.make_batch
    sampler.make_batch = lambda *a: built.append(1) or make_batch(*a)
    rest = list(sampler.epoch(3, k, whole[k - 1].sampler_state))
    assert len(built) == len(whole) - k
    for a, b in zip(whole[k:], rest, strict=True):
        assert torch.equal(a.seq, b.seq) and torch.equal(a.neg, b.neg) and a.sampler_state == b.sampler_state
    with pytest.raises(ValueError, match="state is needed"):
        next(sampler.epoch(3, k))


def test_a_prefetch_left_early_ends_its_thread():
    import threading
    import time

    from seqrec.train.sampler import prefetch

    before = threading.active_count()
    batches = prefetch(iter(range(100)), depth=2)
    assert next(batches) == 0
    time.sleep(0.2)  # the worker fills the queue and waits on it
    batches.close()  # the consumer stops mid-epoch
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before


def test_a_moved_batch_keeps_its_values_and_its_plain_fields():
    """Batch.to (and pin_memory, which shares its mapping) moves the tensors only: the loss weight and the
    negatives generator's state, where a resumed epoch continues, travel unchanged."""
    batch = next(iter(TrainSampler(data(), batch_size=16, maxlen=30, num_negatives=2, seed=0).epoch(0)))
    moved = batch.to(torch.device("cpu"))
    assert moved.loss_weight == batch.loss_weight and moved.sampler_state == batch.sampler_state
    assert all(torch.equal(getattr(moved, k), getattr(batch, k)) for k in ("seq", "pos", "neg", "times"))
