"""mHC's read (RMS, mappings, Sinkhorn, read and mix) written token by token, for `torch.compile`.

Eager PyTorch runs one connection's Sinkhorn as ~250 small kernels over (S, S, N) tensors, each a pass over memory
(seqrec.nn.mhc._MHCRead is the fastest eager form we found, ~1.6x plain SASRec per epoch). Here every entry of the
per-token matrices is its own (N,) tensor, so apart from the mapping matmul the whole read is pointwise over the
N tokens: inductor fuses it into a few loops over N that keep each token's S x S Sinkhorn iterates in registers,
AOTAutograd derives the backward, and its partitioner recomputes the cheap pointwise parts instead of saving them.
The maths is _MHCRead's (mHC, arXiv 2512.24880, Eq. 7-9): same column-max shift and FLOOR, same iterates, and
the tests check values and gradients against it.

The price: compiling takes about a minute on a 2-core machine the first time, a few seconds once inductor's on-disk
cache holds the kernels (same S, D and iterations), and the backward keeps more than _MHCRead's (peak RSS ~1.1x
the eager path's on ML-1M). Hence opt-in (`residual.kernel=compile`), for training steps only (gradients on, fp32
mappings); the evaluation's no-grad passes stay eager, and any failure to compile (no C++ compiler, an unsupported
platform) falls back to the eager path with one warning. Measurements: docs/BENCHMARKS.md, mHC section.
"""

from __future__ import annotations

import logging
from functools import reduce

import torch
from torch import Tensor

from seqrec.nn.sinkhorn import FLOOR

log = logging.getLogger(__name__)
RMS_EPS = 1e-6  # only matters for all-zero (padded) tokens; the paper's 1e-20 would overflow rsqrt in float16


def _total(terms: list[Tensor]) -> Tensor:
    return reduce(torch.add, terms)


def tokenwise_read(state: Tensor, z: Tensor, bias: Tensor, iters: int) -> tuple[Tensor, ...]:
    """The read of _MHCRead.forward after its matmul, with the tokens in the leading dims T.

    Args:
        state: (*T, S, D) streams X; pass a tensor that is not a view (dynamo recompiles per view layout).
        z: (*T, 2S + S^2) = flattened X @ weight, the mapping matmul (left to the caller: inside the graph,
            inductor picks mm kernels by size and recompiles across sizes).
        bias: (2S + S^2,) or (*T, 2S + S^2) static parts.
    Returns:
        u = H_pre X (*T, D), mixed = H_res X (*T, S, D), H_post (*T, S), and without gradient
        [H_pre; H_res] (*T, 1 + S, S) and the mean square of each token's S*D vector (*T,).
    """
    S, D = state.shape[-2:]
    mean_square = (state * state).sum(dim=(-2, -1)) / (S * D)  # (*T,)
    logits = (z * torch.rsqrt(mean_square + RMS_EPS)[..., None] + bias).unbind(dim=-1)  # 2S + S^2 tensors (*T,)
    pre = [torch.sigmoid(t) for t in logits[:S]]
    post = [2 * torch.sigmoid(t) for t in logits[S : 2 * S]]
    res_logits = [logits[2 * S + i * S : 2 * S + (i + 1) * S] for i in range(S)]  # [row i][column j]
    # K = exp(logits - column max), floored at exp(-FLOOR); M does not depend on the shift, hence no gradient
    col_max = [reduce(torch.maximum, [res_logits[i][j] for i in range(S)]).detach() for j in range(S)]
    K = [[torch.exp(torch.clamp_min(res_logits[i][j] - col_max[j], -FLOOR)) for j in range(S)] for i in range(S)]
    u = [None] * S  # u_0 = 1
    for _ in range(iters):
        v = [1 / _total([K[i][j] if u[i] is None else K[i][j] * u[i] for i in range(S)]) for j in range(S)]
        u = [1 / _total([K[i][j] * v[j] for j in range(S)]) for i in range(S)]
    res = [[u[i] * K[i][j] * v[j] for j in range(S)] for i in range(S)]  # diag(u) K diag(v)
    streams = state.unbind(dim=-2)  # S tensors (*T, D)
    read = _total([pre[j][..., None] * streams[j] for j in range(S)])  # (*T, D)
    mixed = torch.stack([_total([res[i][j][..., None] * streams[j] for j in range(S)]) for i in range(S)], dim=-2)
    read_mix = torch.stack(pre + [r for row in res for r in row], dim=-1).unflatten(-1, (1 + S, S))
    return read, mixed, torch.stack(post, dim=-1), read_mix.detach(), mean_square.detach()


class CompiledRead:
    """`tokenwise_read` through torch.compile (dynamic in the token count), or None once compiling has failed."""

    def __init__(self):
        self._compiled = None
        self.failure: str | None = None

    def __call__(self, state: Tensor, z: Tensor, bias: Tensor, iters: int) -> tuple[Tensor, ...] | None:
        if self.failure is not None:
            return None
        if self._compiled is None:
            self._compiled = torch.compile(tokenwise_read, dynamic=True)
        try:
            return self._compiled(state, z, bias, iters)
        except Exception as error:  # noqa: BLE001 - any compiler failure: the eager path computes the same
            first_line = (str(error).strip().splitlines() or [""])[0]
            self.failure = f"{type(error).__name__}: {first_line}"
            log.warning(
                "mHC: torch.compile failed (%s); using the eager kernels (as residual.kernel=eager)",
                self.failure,
            )
            return None


compiled_read = CompiledRead()  # one per process: inductor's caches are per process anyway
