"""mHC: manifold-constrained hyper-connections around one sublayer (arXiv 2512.24880, Eq. 3 and 7-9).

The residual stream is widened to S parallel streams, X: (B, L, S, D). Each sublayer reads one vector from them
(H_pre), writes its output back to every stream (H_post) and mixes the streams through a doubly stochastic matrix
(H_res, Sinkhorn-Knopp), all three per token, from a static bias plus a gated linear map of the RMS-normalised state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from seqrec.nn.sinkhorn import sinkhorn

RMS_EPS = 1e-6  # only matters for all-zero (padded) tokens; the paper's 1e-20 would overflow rsqrt in float16
LOGIT_ONE = 17.0  # sigmoid(17) rounds to 1.0 in float32: the read weight 1/S for S = 1


def default_res_diag(streams: int) -> float:
    """Diagonal of the static H_res logits that makes Sinkhorn(b_res) = 0.9 I + 0.1/(S-1) (1 - I) exactly."""
    return math.log(9 * (streams - 1)) if streams > 1 else 0.0


class MHCConnection(nn.Module):
    """X <- H_res X + H_post^T F(H_pre X) for one sublayer F over an (B, L, S, D) stream state.

    Pre-LN (`norm_first`): F(u) = sublayer(LN(u)), the paper's form (F keeps its own pre-norm, no residual inside).
    Post-LN: F(u) = sublayer(u), and the LayerNorm (one set of weights, applied to each stream over D) follows the
    write-back: X <- LN(H_res X + H_post^T F(H_pre X)). This is the one placement that reduces to the Post-LN block
    LN(x + F(x)) when the streams are equal and the mappings neutral (the identity the tests check); it gives up
    mHC's norm-preservation argument, since the per-stream LN rescales every stream after the doubly stochastic mix.

    Args:
        dim: hidden size D.
        norm_first: Pre-LN if True, Post-LN (per-stream LN after the write-back) if False.
        streams: expansion rate S.
        sinkhorn_iters: column-then-row Sinkhorn rounds for H_res.
        init_gate: initial value of the three gates alpha (pre, post, res); 0 makes the mappings static.
        res_diag_init: diagonal of the static H_res logits (off-diagonal 0); None: ln(9(S-1)), 0.9 on the diagonal.
        fp32_mappings: compute the mappings, Sinkhorn and the stream mixing in float32 even under autocast.
        ln_eps: epsilon of the sublayer's LayerNorm.
    """

    def __init__(
        self,
        dim: int,
        norm_first: bool,
        *,
        streams: int,
        sinkhorn_iters: int,
        init_gate: float,
        res_diag_init: float | None,
        fp32_mappings: bool,
        ln_eps: float,
    ):
        super().__init__()
        self.dim, self.streams, self.norm_first = dim, streams, norm_first
        self.sinkhorn_iters, self.fp32_mappings = sinkhorn_iters, fp32_mappings
        self.init_gate = init_gate
        self.res_diag_init = default_res_diag(streams) if res_diag_init is None else res_diag_init
        S = streams
        self.phi = nn.Parameter(torch.empty(S * dim, 2 * S + S * S))  # dynamic maps [pre | post | res]
        self.bias = nn.Parameter(torch.empty(2 * S + S * S))  # static parts b_pre, b_post, vec(b_res)
        self.alpha = nn.Parameter(torch.empty(3))  # gates of the dynamic parts: pre, post, res
        self.gain = nn.Parameter(torch.empty(S * dim))  # RMSNorm gain over the flattened S*D vector
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.last: dict[str, Tensor] = {}  # mappings of the latest forward, for diagnostics
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """models.md 4.4: uniform read 1/S, unit write, identity-leaning doubly stochastic mix, small gates."""
        S = self.streams
        nn.init.normal_(self.phi, std=1.0 / math.sqrt(S * self.dim))
        b_pre = -math.log(S - 1) if S > 1 else LOGIT_ONE  # sigmoid(b_pre) = 1/S
        b_res = torch.eye(S) * self.res_diag_init
        with torch.no_grad():
            self.bias.copy_(torch.cat([torch.full((S,), b_pre), torch.zeros(S), b_res.flatten()]))
            self.alpha.fill_(self.init_gate)
        nn.init.ones_(self.gain)
        self.norm.reset_parameters()

    def mappings(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L, S, D) state -> read-and-mix matrices (B, L, 1 + S, S) = [H_pre; H_res] and H_post (B, L, S).

        Fused form of Eq. 7-9: RMSNorm gain and gates are folded into phi, the matmul runs on the un-normalised
        flattened state and is divided by its RMS afterwards (equal to RMSNorm, then matmul). The logits are
        computed transposed, tokens last, so that sigmoid and Sinkhorn work on contiguous per-token vectors.
        """
        B, L, S, D = X.shape
        x = X.reshape(B * L, S * D)
        gates = torch.cat([self.alpha[:2].repeat_interleave(S), self.alpha[2].expand(S * S)])  # (2S + S^2,)
        weight = self.phi * self.gain[:, None] * gates  # (S*D, 2S + S^2)
        mean_square = x.square().mean(dim=-1)  # (B*L,)
        logits = (weight.t() @ x.t()) * torch.rsqrt(mean_square + RMS_EPS) + self.bias[:, None]  # (2S + S^2, B*L)
        pre = torch.sigmoid(logits[:S])  # (S, B*L)
        post = 2 * torch.sigmoid(logits[S : 2 * S])
        res = sinkhorn(logits[2 * S :].view(S, S, B * L), self.sinkhorn_iters)  # (S, S, B*L)
        # back to tokens first; contiguous, or the batched matmuls take a per-token slow path on CPU
        read_mix = torch.cat([pre, res.view(S * S, B * L)]).t().contiguous().view(B, L, 1 + S, S)
        post = post.t().contiguous().view(B, L, S)
        # kept for MHC.diagnostics (no copy); all-zero tokens are padding
        self.last = {"read_mix": read_mix.detach(), "post": post.detach(), "real": (mean_square > 0).view(B, L)}
        return read_mix, post

    def forward(self, state: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        """(B, L, S, D) state -> (B, L, S, D); `sublayer` maps (B, L, D) -> (B, L, D) under the caller's autocast."""
        with self._mapping_precision(state):
            X = state.float() if self.fp32_mappings else state
            read_mix, post = self.mappings(X)
            # one batched matmul does the read (row 0: H_pre X) and the mixing (rows 1..S: H_res X)
            read_mix = read_mix @ X  # (B, L, 1 + S, D)
        u, mixed = read_mix[..., 0, :], read_mix[..., 1:, :]
        out = sublayer(self.norm(u) if self.norm_first else u)  # (B, L, D)
        state = torch.addcmul(mixed, post.unsqueeze(-1), out.unsqueeze(-2).to(mixed.dtype))  # write to every stream
        return state if self.norm_first else self.norm(state)

    def _mapping_precision(self, state: Tensor):
        return torch.autocast(state.device.type, enabled=False) if self.fp32_mappings else nullcontext()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, streams={self.streams}, norm_first={self.norm_first}, iters={self.sinkhorn_iters}"
