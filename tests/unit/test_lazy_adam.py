"""Lazy Adam against torch's own optimizers: SparseAdam on the sparse table, AdamW on the rest, bit for bit; its
state through a checkpoint; the schedule and the fp16 GradScaler driving it as they drive Adam."""

import copy
import io

import pytest
import torch

from seqrec.models.sasrec import SASRec
from seqrec.train import schedules
from seqrec.train.lazy_adam import LazyAdam
from seqrec.train.losses import SampledSoftmax

BETAS = (0.9, 0.98)


def small_model(sparse: bool, seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    kwargs = dict(num_items=40, maxlen=8, hidden_units=16, num_blocks=1, num_heads=1, dropout_rate=0.0)
    return SASRec(**kwargs, sparse_embedding=sparse)


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    seq = torch.randint(0, 41, (4, 8), generator=g)  # 0s: padding in the input
    pos = torch.randint(0, 41, (4, 8), generator=g)  # 0s: masked targets
    neg = torch.randint(1, 41, (4, 6), generator=g)
    return seq, pos, neg


def train_steps(model, optimizers, steps, start=0, before_step=lambda: None):
    loss = SampledSoftmax(num_negatives=6)
    for step in range(start, start + steps):
        seq, pos, neg = batch(step)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss(model(seq), model.head, pos, neg).backward()
        before_step()
        for opt in optimizers:
            opt.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_each_step_equals_sparse_adam_on_the_table_and_adamw_on_the_rest(weight_decay):
    ours, ref = small_model(sparse=True), small_model(sparse=True)
    table = ref.item_emb.weight
    rest = [p for p in ref.parameters() if p is not table]
    lazy = LazyAdam(ours.parameters(), lr=0.01, betas=BETAS, weight_decay=weight_decay)
    references = [
        torch.optim.SparseAdam([table], lr=0.01, betas=BETAS),
        torch.optim.AdamW(rest, lr=0.01, betas=BETAS, weight_decay=weight_decay),
    ]

    def decay_touched_rows():  # SparseAdam has no decay: ours decays the gradient's rows, then takes its step
        rows = table.grad.coalesce().indices()[0]
        with torch.no_grad():
            table[rows] *= 1 - 0.01 * weight_decay

    for step in range(4):
        train_steps(ours, [lazy], 1, start=step)
        train_steps(ref, references, 1, start=step, before_step=decay_touched_rows if weight_decay else lambda: None)
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), (step, name)


def test_untouched_rows_keep_their_weights_and_moments():
    model = small_model(sparse=True)
    lazy = LazyAdam(model.parameters(), lr=0.01, betas=BETAS)
    train_steps(model, [lazy], 1)
    before = model.item_emb.weight.detach().clone()
    moments = {k: lazy.state[model.item_emb.weight][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    seq, pos, neg = batch(1)
    touched = torch.zeros(41, dtype=torch.bool)
    touched[torch.cat([seq.flatten(), pos.flatten(), neg.flatten()])] = True
    touched[0] = False
    train_steps(model, [lazy], 1, start=1)
    after, state = model.item_emb.weight.detach(), lazy.state[model.item_emb.weight]
    assert torch.equal(after[~touched], before[~touched]) and not torch.equal(after[touched], before[touched])
    for key, old in moments.items():
        assert torch.equal(state[key][~touched], old[~touched]), key
    assert torch.count_nonzero(after[0]) == 0  # padding stays zero


def test_dense_gradients_only_is_adamw():
    ours, ref = small_model(sparse=False), small_model(sparse=False)
    lazy = LazyAdam(ours.parameters(), lr=0.01, betas=BETAS, weight_decay=0.05)
    adamw = torch.optim.AdamW(ref.parameters(), lr=0.01, betas=BETAS, weight_decay=0.05)
    train_steps(ours, [lazy], 3)
    train_steps(ref, [adamw], 3)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name


def test_state_dict_round_trip_continues_as_an_unbroken_run():
    unbroken, stopped = small_model(sparse=True), small_model(sparse=True)
    opt_unbroken = LazyAdam(unbroken.parameters(), lr=0.01, betas=BETAS)
    opt_stopped = LazyAdam(stopped.parameters(), lr=0.01, betas=BETAS)
    train_steps(unbroken, [opt_unbroken], 5)
    train_steps(stopped, [opt_stopped], 2)
    buffer = io.BytesIO()
    torch.save({"model": stopped.state_dict(), "optimizer": opt_stopped.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # what the trainer's checkpoints go through
    resumed = small_model(sparse=True, seed=1)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt_resumed = LazyAdam(resumed.parameters(), lr=0.01, betas=BETAS)
    opt_resumed.load_state_dict(saved["optimizer"])
    train_steps(resumed, [opt_resumed], 3, start=2)
    for (name, p), q in zip(unbroken.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_the_schedule_sets_its_lr_and_the_table_follows_it():
    model = small_model(sparse=True)
    lazy = LazyAdam(model.parameters(), lr=0.01, betas=BETAS)
    scheduler = schedules.cosine(lazy, steps_per_epoch=2, num_epochs=2, warmup_steps=0)
    frozen = copy.deepcopy(model)
    for _ in range(4):  # the cosine reaches 0 after 4 steps
        train_steps(model, [lazy], 1)
        scheduler.step()
    assert lazy.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    before = model.item_emb.weight.detach().clone()
    train_steps(model, [lazy], 1, start=4)  # lr 0: nothing moves, sparse rows included
    assert torch.equal(model.item_emb.weight, before)
    assert not torch.equal(model.item_emb.weight, frozen.item_emb.weight)


def test_the_fp16_grad_scaler_unscales_the_sparse_gradient():
    model = small_model(sparse=True)
    lazy = LazyAdam(model.parameters(), lr=0.01, betas=BETAS)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    seq, pos, neg = batch(0)
    loss = SampledSoftmax(num_negatives=6)(model(seq), model.head, pos, neg)
    scaler.scale(loss).backward()
    scaled = model.item_emb.weight.grad.coalesce().values().clone()
    scaler.unscale_(lazy)
    grad = model.item_emb.weight.grad
    assert grad.is_sparse and torch.allclose(grad.coalesce().values() * 2.0**4, scaled)
    before = model.item_emb.weight.detach().clone()
    scaler.step(lazy)
    scaler.update()
    assert not torch.equal(model.item_emb.weight, before)


def test_a_sparse_table_meets_a_dense_optimizer_with_torchs_error():
    model = small_model(sparse=True)
    with pytest.raises(RuntimeError, match="sparse"):
        train_steps(model, [torch.optim.Adam(model.parameters())], 1)  # why the config check refuses the pair
