"""Lazy Adam (`optimizer=lazy_adam`): AdamW for dense gradients, a row-wise lazy Adam for sparse ones.

At 10^6 items the item table (I+1, D) is nearly the whole model, yet one training step touches only the rows of
its batch's items (inputs, targets, negatives: tens of thousands). With `model.sparse_embedding=true` the table's
gradient is a sparse tensor of those rows, and this optimizer updates them alone. For a touched row r, with g_r its
gradient summed over the batch's occurrences and t the table's step count:

    W_r <- W_r (1 - lr wd)                                         (decoupled decay, touched rows only)
    m_r <- b1 m_r + (1 - b1) g_r            v_r <- b2 v_r + (1 - b2) g_r²
    W_r <- W_r - lr sqrt(1 - b2^t) / (1 - b1^t) m_r / (sqrt(v_r) + eps)

which is torch.optim.SparseAdam's update (the same arithmetic, in the same order) plus the decay. Rows outside the
batch keep their weights and moments as they are: dense Adam would decay their moments and keep moving them along
their last momentum. That makes lazy Adam a different optimiser, not a faster Adam: a rare item moves only when it
is seen, by its own statistics (docs/SCALING.md says when that is worth it).

Every parameter with a dense gradient (the Transformer, the position tables) takes torch.optim.AdamW's step
through its functional form, so the same arithmetic as `optimizer=adamw` with the same keys. One optimizer, one
param group, Adam's per-parameter state (step, exp_avg, exp_avg_sq): the lr schedule (LambdaLR), GradScaler and
checkpoints (`state_dict`, `load_state_dict`) see an ordinary torch optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.adam import adam

from seqrec.utils.rules import ADAM_RULES


class LazyAdam(Optimizer):
    """AdamW on dense gradients, lazy row-wise Adam (torch.optim.SparseAdam's step) on sparse ones.

    Args:
        params: the model's parameters (the Trainer completes the config partial with them).
        lr: peak learning rate (the schedule multiplies it).
        betas: (b1, b2) moment decay rates.
        eps: added to sqrt(v), as AdamW and SparseAdam each place it.
        weight_decay: decoupled decay: every dense parameter at every step, a sparse table's touched rows only.
    """

    handles_sparse_gradients = True  # read by the config check (model.sparse_embedding needs such an optimizer)
    RULES = ADAM_RULES

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _state(self, p: Tensor) -> dict:
        """Adam's per-parameter state, created on a parameter's first gradient (step is a CPU scalar, as Adam's)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            self._dense_step(group, [p for p in with_grad if not p.grad.is_sparse])
            for p in with_grad:
                if p.grad.is_sparse:
                    self._lazy_step(group, p)
        return loss

    def _dense_step(self, group: dict, params: list[Tensor]) -> None:
        """torch.optim.AdamW's step (its defaults: no amsgrad, foreach where torch picks it) on `params`."""
        if not params:
            return
        states = [self._state(p) for p in params]
        beta1, beta2 = group["betas"]
        adam(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def _lazy_step(self, group: dict, p: Tensor) -> None:
        """The module docstring's update on the rows of p's sparse gradient; every other row is left untouched."""
        grad = p.grad.coalesce()  # rows summed over their occurrences: the update is non-linear in g
        rows, g = grad.indices()[0], grad.values()  # (R,), (R, D)
        if rows.numel() == 0:
            return
        state = self._state(p)
        state["step"] += 1
        t = state["step"].item()
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        m_old = state["exp_avg"].index_select(0, rows)  # (R, D)
        v_old = state["exp_avg_sq"].index_select(0, rows)
        # m + (1 - b1)(g - m), in SparseAdam's order, so both give the same bits
        m = (g - m_old).mul_(1 - beta1).add_(m_old)
        v = g.pow(2).sub_(v_old).mul_(1 - beta2).add_(v_old)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)
        if decay != 0:
            p.index_copy_(0, rows, p.index_select(0, rows).mul_(1 - lr * decay))
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        p.index_add_(0, rows, m.div_(v.sqrt_().add_(eps)).mul_(-step_size))
