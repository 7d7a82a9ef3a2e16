"""Residual connections as pluggable factories (the hyper-connections API: expand, wrap each sublayer, reduce).

A factory provides `expand(x)` once after the embedding, `connection(dim, norm_first)` for each sublayer and
`reduce(state)` once before the final norm, so one code path in the blocks serves the plain residual and mHC
(manifold-constrained hyper-connections, arXiv 2512.24880; the maths is in seqrec.nn.mhc and seqrec.nn.sinkhorn).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from seqrec.errors import ConfigError
from seqrec.nn.mhc import MHCConnection

LN_EPS = 1e-8  # as the SASRec TF code and SASRec.pytorch
KERNELS = ("auto", "native", "compile", "eager")  # how MHCConnection runs (seqrec.nn.mhc)


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
        kernel: "auto" (C++ kernels on the CPU where a compiler is present, else eager PyTorch), "native",
            "compile" (torch.compile of the read) or "eager"; same maths, see MHCConnection.
        compile: older spelling of kernel="compile" (kept so that earlier commands still run).
    """

    def __init__(
        self,
        *,
        expansion_rate: int = 4,
        sinkhorn_iters: int = 20,
        init_gate: float = 0.01,
        fp32_mappings: bool = True,
        readout: str = "sum",
        res_diag_init: float | None = None,
        kernel: str = "auto",
        compile: bool = False,
    ):
        problems = []
        if expansion_rate < 1:
            problems.append(f"residual.expansion_rate={expansion_rate} must be >= 1")
        if sinkhorn_iters < 1:
            problems.append(f"residual.sinkhorn_iters={sinkhorn_iters} must be >= 1")
        if kernel not in KERNELS:
            problems.append(f"residual.kernel={kernel!r} must be one of {', '.join(KERNELS)}")
        if readout not in ("sum", "mean"):
            problems.append(f"residual.readout={readout!r} must be 'sum' or 'mean'")
        if problems:
            raise ConfigError("; ".join(problems))
        self.expansion_rate, self.sinkhorn_iters, self.init_gate = expansion_rate, sinkhorn_iters, init_gate
        self.fp32_mappings, self.readout, self.res_diag_init = fp32_mappings, readout, res_diag_init
        self.kernel = "compile" if compile else kernel

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
            kernel=self.kernel,
        )

    def expand(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, S, D): every stream starts as the embedding.

        A view (stream stride 0): the native kernels read it as it is, which saves writing and re-reading S copies;
        the eager and compiled paths copy it first (their batched matmuls take a slow path on a stride-0 dim)."""
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
            real = module.last["real"]
            read_mix, post = module.last["read_mix"][real], module.last["post"][real]  # (N, 1 + S, S), (N, S)
            pre, res = read_mix[:, 0], read_mix[:, 1:]
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
            f"res_diag_init={self.res_diag_init}, kernel={self.kernel!r})"
        )
