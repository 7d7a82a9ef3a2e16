"""Residual connections as pluggable factories (the hyper-connections API: expand, wrap each sublayer, reduce).

A factory provides `expand(x)` once after the embedding, `connection(dim, norm_first)` for each sublayer and
`reduce(state)` once before the final norm, so one code path in the blocks serves the plain residual, the gated one
(LiGR's) and mHC (manifold-constrained hyper-connections, arXiv 2512.24880, Eq. 3 and 7-9).

This file is the reference: plain PyTorch, autograd for every gradient. A faster implementation of the same
connection (C++ kernels for the CPU) is a plug-in in seqrec.kernels, tested against this one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from seqrec import kernels
from seqrec.errors import ConfigError
from seqrec.utils.rules import FINITE, POSITIVE, one_of

log = logging.getLogger(__name__)

LN_EPS = 1e-8  # as the SASRec TF code and SASRec.pytorch
RMS_EPS = 1e-6  # mHC's RMSNorm; only matters for all-zero (padded) tokens (the paper's 1e-20 overflows in float16)
SINKHORN_FLOOR = 20.0  # Sinkhorn entries stay >= exp(-20) of their column's largest: every sum stays positive
LOGIT_ONE = 17.0  # sigmoid(17) rounds to 1.0 in float32: the read weight 1/S for S = 1


class PlainConnection(nn.Module):
    """x + F(LN(x)) when norm_first (Pre-LN), else LN(x + F(x)) (Post-LN)."""

    def __init__(self, dim: int, norm_first: bool):
        super().__init__()
        self.norm_first = norm_first
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor], keep: Tensor | None = None) -> Tensor:
        """(B, L, D) -> (B, L, D); rows where the (B, L) `keep` is False/0 (padding) come out zero."""
        y = x + sublayer(self.norm(x)) if self.norm_first else self.norm(x + sublayer(x))
        return y if keep is None else y * keep[..., None]


class Plain:
    """The ordinary residual stream: one (B, L, D) state, nothing to expand or reduce."""

    def connection(self, dim: int, norm_first: bool) -> nn.Module:
        return PlainConnection(dim, norm_first)

    def expand(self, x: Tensor) -> Tensor:
        return x

    def reduce(self, state: Tensor) -> Tensor:
        return state

    def __repr__(self) -> str:
        return "Plain()"


class GatedConnection(nn.Module):
    """x + g * F(LN(x)) (Pre-LN) or LN(x + g * F(x)) (Post-LN), with a per-token, per-channel gate g = sigmoid(W x + b).

    The gate reads the residual stream itself (not its normalised copy), so each token decides how much of the
    sublayer's update to take in: LiGR's gated residual (Gu et al. 2025, arXiv 2502.03417), the layer eSASRec puts
    in SASRec (arXiv 2508.06450). With W = 0 and b large the gate is 1 and this is PlainConnection.
    """

    def __init__(self, dim: int, norm_first: bool):
        super().__init__()
        self.norm_first = norm_first
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.gate = nn.Linear(dim, dim)  # torch's default init: g starts near 0.5 on average, not at 1

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor], keep: Tensor | None = None) -> Tensor:
        """(B, L, D) -> (B, L, D); rows where the (B, L) `keep` is False/0 (padding) come out zero."""
        g = torch.sigmoid(self.gate(x))  # (B, L, D)
        y = x + g * sublayer(self.norm(x)) if self.norm_first else self.norm(x + g * sublayer(x))
        return y if keep is None else y * keep[..., None]


class Gated(Plain):
    """The plain residual stream with a learned gate on each sublayer's update (GatedConnection)."""

    def connection(self, dim: int, norm_first: bool) -> nn.Module:
        return GatedConnection(dim, norm_first)

    def __repr__(self) -> str:
        return "Gated()"


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """(..., S, S) logits -> (..., S, S) doubly stochastic: exp, then `iters` rounds of column-then-row normalising.

    Rows sum to 1 (normalised last), columns approximately (closer with more rounds). exp(logits) is taken after
    subtracting each column's maximum, which the first column normalisation cancels exactly (so no exp overflows);
    entries more than SINKHORN_FLOOR below their column's maximum are raised to it, which keeps every sum positive
    and the gradient finite at any spread. The maximum is a constant for autograd (the result does not depend on it).
    """
    m = (logits - logits.amax(dim=-2, keepdim=True).detach()).clamp_min(-SINKHORN_FLOOR).exp()
    for _ in range(iters):  # times the reciprocal rather than divided: its backward is ~30 % cheaper
        m = m * m.sum(dim=-2, keepdim=True).reciprocal()  # columns
        m = m * m.sum(dim=-1, keepdim=True).reciprocal()  # rows
    return m


def default_res_diag(streams: int) -> float:
    """Diagonal of the static H_res logits that makes Sinkhorn(b_res) = 0.9 I + 0.1/(S-1) (1 - I) exactly."""
    return math.log(9 * (streams - 1)) if streams > 1 else 0.0


class MHCConnection(nn.Module):
    """X <- H_res X + H_post^T F(H_pre X) for one sublayer F over an (B, L, S, D) state of S streams.

    Per token, from the RMS-normalised state x = RMSNorm(X flattened to S*D) (Eq. 7-9):
        H_pre  = sigmoid(alpha_pre  * x phi_pre  + b_pre)              (S,)   read weights
        H_post = 2 sigmoid(alpha_post * x phi_post + b_post)           (S,)   write weights
        H_res  = Sinkhorn(alpha_res * x phi_res + b_res)               (S, S) doubly stochastic stream mixing

    Pre-LN (`norm_first`): F(u) = sublayer(LN(u)), the paper's form. Post-LN: F(u) = sublayer(u), and the LayerNorm
    (one set of weights, applied to each stream over D) follows the write-back: X <- LN(H_res X + H_post^T F(H_pre X)).
    That placement reduces to the Post-LN block LN(x + F(x)) when the streams are equal and the mappings neutral
    (the tests check it); it gives up mHC's norm-preservation argument, since LN rescales each stream after the mix.

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
        self.sinkhorn_iters, self.fp32_mappings, self.init_gate = sinkhorn_iters, fp32_mappings, init_gate
        self.res_diag_init = default_res_diag(streams) if res_diag_init is None else res_diag_init
        S = streams
        self.phi = nn.Parameter(torch.empty(S * dim, 2 * S + S * S))  # dynamic maps, columns [pre | post | res]
        self.bias = nn.Parameter(torch.empty(2 * S + S * S))  # static parts [b_pre | b_post | b_res row-major]
        self.alpha = nn.Parameter(torch.empty(3))  # gates of the dynamic parts: pre, post, res
        self.gain = nn.Parameter(torch.empty(S * dim))  # RMSNorm gain over the flattened S*D vector
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.last: dict[str, Tensor] = {}  # mappings of the latest forward, for MHC.diagnostics
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform read 1/S, unit write, identity-leaning doubly stochastic mix, small gates."""
        S = self.streams
        nn.init.normal_(self.phi, std=1.0 / math.sqrt(S * self.dim))
        b_pre = -math.log(S - 1) if S > 1 else LOGIT_ONE  # sigmoid(b_pre) = 1/S
        b_res = torch.eye(S) * self.res_diag_init
        with torch.no_grad():
            self.bias.copy_(torch.cat([torch.full((S,), b_pre), torch.zeros(S), b_res.flatten()]))
            self.alpha.fill_(self.init_gate)
        nn.init.ones_(self.gain)
        self.norm.reset_parameters()

    def mappings(self, X: Tensor, matmul_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, S, D) state -> H_pre (B, L, S), H_post (B, L, S), H_res (B, L, S, S)."""
        S = self.streams
        x = nn.functional.rms_norm(X.flatten(-2), (S * self.dim,), self.gain.to(X.dtype), eps=RMS_EPS)  # (B, L, S*D)
        dynamic = _matmul(x, self.phi.to(x.dtype), matmul_dtype)  # (B, L, 2S + S^2)
        gates = torch.cat([self.alpha[:2].repeat_interleave(S), self.alpha[2].expand(S * S)])  # (2S + S^2,)
        logits = dynamic * gates.to(x.dtype) + self.bias.to(x.dtype)
        pre = torch.sigmoid(logits[..., :S])
        post = 2 * torch.sigmoid(logits[..., S : 2 * S])
        res = sinkhorn(logits[..., 2 * S :].unflatten(-1, (S, S)), self.sinkhorn_iters)
        return pre, post, res

    def forward(self, state: Tensor, sublayer: Callable[[Tensor], Tensor], keep: Tensor | None = None) -> Tensor:
        """(B, L, S, D) state -> (B, L, S, D); `sublayer` maps (B, L, D) -> (B, L, D) under the caller's autocast.

        Rows where the (B, L) `keep` is False/0 (padding) come out zero in every stream.
        """
        if (fast := kernels.find("mhc", state.device, self, state)) is not None:
            return fast(self, state, sublayer, keep)
        device = state.device.type
        # fp32_mappings=False under autocast: the matmuls run in autocast's dtype, as autocast would run them
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        matmul_dtype = None if self.fp32_mappings else low
        X = state.float() if self.fp32_mappings else state
        with torch.autocast(device, enabled=False):
            pre, post, res = self.mappings(X, matmul_dtype)
            u = _matmul(pre.unsqueeze(-2), X, matmul_dtype).squeeze(-2)  # (B, L, D) = H_pre X
            mixed = _matmul(res, X, matmul_dtype)  # (B, L, S, D) = H_res X
        self.last = {"pre": pre.detach(), "post": post.detach(), "res": res.detach()}
        self.last["real"] = X.detach().ne(0).flatten(-2).any(-1)  # (B, L): all-zero tokens are padding
        out = sublayer(self.norm(u) if self.norm_first else u)  # (B, L, D)
        X = mixed + post.unsqueeze(-1) * out.unsqueeze(-2).to(mixed.dtype)  # write to every stream
        X = X if self.norm_first else self.norm(X)
        return X if keep is None else X * keep[..., None, None]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, streams={self.streams}, norm_first={self.norm_first}, iters={self.sinkhorn_iters}"


def _matmul(a: Tensor, b: Tensor, dtype: torch.dtype | None) -> Tensor:
    """a @ b, in `dtype` if given (autocast's, for fp32_mappings=False), the result in a's dtype."""
    return a @ b if dtype is None else (a.to(dtype) @ b.to(dtype)).to(a.dtype)


class MHC:
    """Manifold-constrained hyper-connections: an (B, L, S, D) state of S streams carried through every sublayer.

    The embedding is copied into the S streams once (`expand`), every sublayer gets its own `MHCConnection` (own
    phi, b, alpha, RMSNorm gain, LayerNorm), and the streams are summed or averaged once before the final norm
    (`reduce`). With `init_gate=0` and `readout="mean"` the model equals the plain residual model with the same
    sublayer weights, for Pre-LN and Post-LN alike (see MHCConnection for what `norm_first` means here).

    Args:
        expansion_rate: number of streams S (n in the paper); 1 gives the plain residual with a gated read/write.
        sinkhorn_iters: Sinkhorn-Knopp rounds (columns, then rows) projecting H_res onto doubly stochastic matrices.
        init_gate: initial gates alpha of the dynamic (token-dependent) parts of H_pre, H_post, H_res.
        fp32_mappings: run the mappings, Sinkhorn and the stream mixing in float32 under autocast ("mhc_no_amp").
        readout: "sum" (Hyper-Connections) or "mean" over the streams; a LayerNorm follows, so they differ only
            through its epsilon.
        res_diag_init: diagonal of the static H_res logits; None: ln(9(S-1)), i.e. 0.9 on the diagonal at init.
        kernel, compile: accepted and ignored, so that configs saved before the top-level `kernels` switch
            (which now chooses between the reference and the fast kernels) still load.
    """

    RULES = {
        "expansion_rate": POSITIVE,
        "sinkhorn_iters": POSITIVE,
        "init_gate": FINITE,
        "res_diag_init": FINITE,
        "readout": one_of("sum", "mean"),
    }

    def __init__(
        self,
        *,
        expansion_rate: int = 4,
        sinkhorn_iters: int = 20,
        init_gate: float = 0.01,
        fp32_mappings: bool = True,
        readout: str = "sum",
        res_diag_init: float | None = None,
        kernel: str | None = None,
        compile: bool | None = None,
    ):
        problems = []
        if expansion_rate < 1:
            problems.append(f"residual.expansion_rate={expansion_rate} must be >= 1")
        if sinkhorn_iters < 1:
            problems.append(f"residual.sinkhorn_iters={sinkhorn_iters} must be >= 1")
        if readout not in ("sum", "mean"):
            problems.append(f"residual.readout={readout!r} must be 'sum' or 'mean'")
        if problems:
            raise ConfigError("; ".join(problems))
        if kernel is not None or compile is not None:
            log.warning("residual.kernel and residual.compile are ignored; set kernels=auto|reference instead")

        self.expansion_rate, self.sinkhorn_iters, self.init_gate = expansion_rate, sinkhorn_iters, init_gate
        self.fp32_mappings, self.readout, self.res_diag_init = fp32_mappings, readout, res_diag_init

    def connection(self, dim: int, norm_first: bool) -> nn.Module:
        return MHCConnection(
            dim,
            norm_first,
            streams=self.expansion_rate,
            sinkhorn_iters=self.sinkhorn_iters,
            init_gate=self.init_gate,
            res_diag_init=self.res_diag_init,
            fp32_mappings=self.fp32_mappings,
            ln_eps=LN_EPS,
        )

    def expand(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, S, D): every stream starts as the embedding.

        A view (stream stride 0): the CPU kernels read it as it is, which saves writing and re-reading S copies."""
        return x.unsqueeze(-2).expand(*x.shape[:-1], self.expansion_rate, x.shape[-1])

    def reduce(self, state: Tensor) -> Tensor:
        """(B, L, S, D) -> (B, L, D)."""
        return state.sum(dim=-2) if self.readout == "sum" else state.mean(dim=-2)

    @staticmethod
    @torch.no_grad()
    def diagnostics(model: nn.Module) -> dict[str, float]:
        """Health of the mappings in the latest forward pass, over its non-padded tokens (docs/MODELS.md, section 4.6).

        Per connection: min/max row and column sums of H_res, mean H_pre and H_post, the gates alpha; across depth:
        the largest absolute row sum (forward gain) and column sum (backward gain) of the per-token product of all
        H_res, the paper's "Amax gain". Costs a host sync: call it every few hundred steps, not every step.
        """
        stats: dict[str, float] = {}
        composite = None
        for name, module in model.named_modules():
            if not isinstance(module, MHCConnection):
                continue
            for gate, value in zip(("pre", "post", "res"), module.alpha.tolist()):
                stats[f"mhc/{name}/alpha_{gate}"] = value
            if not module.last:
                continue
            real = module.last["real"]  # (B, L)
            pre, post, res = (module.last[k][real] for k in ("pre", "post", "res"))  # (N, S), (N, S), (N, S, S)
            rows, cols = res.sum(dim=-1), res.sum(dim=-2)
            stats.update(
                {
                    f"mhc/{name}/res_row_min": rows.min().item(),
                    f"mhc/{name}/res_row_max": rows.max().item(),
                    f"mhc/{name}/res_col_min": cols.min().item(),
                    f"mhc/{name}/res_col_max": cols.max().item(),
                    f"mhc/{name}/pre_mean": pre.mean().item(),
                    f"mhc/{name}/post_mean": post.mean().item(),
                }
            )
            composite = res if composite is None or composite.shape != res.shape else res @ composite
        if composite is not None:
            stats["mhc/composite_fwd_gain"] = composite.abs().sum(dim=-1).max().item()
            stats["mhc/composite_bwd_gain"] = composite.abs().sum(dim=-2).max().item()
        return stats

    def __repr__(self) -> str:
        return (
            f"MHC(expansion_rate={self.expansion_rate}, sinkhorn_iters={self.sinkhorn_iters}, "
            f"init_gate={self.init_gate}, fp32_mappings={self.fp32_mappings}, readout={self.readout!r}, "
            f"res_diag_init={self.res_diag_init})"
        )
