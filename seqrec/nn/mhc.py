"""mHC: manifold-constrained hyper-connections around one sublayer (arXiv 2512.24880, Eq. 3 and 7-9).

The residual stream is widened to S parallel streams, X: (B, L, S, D). Each sublayer reads one vector from them
(H_pre), writes its output back to every stream (H_post) and mixes the streams through a doubly stochastic matrix
(H_res, Sinkhorn-Knopp), all three per token, from a static bias plus a gated linear map of the RMS-normalised state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from seqrec.nn import mhc_compiled, mhc_native
from seqrec.nn.mhc_compiled import RMS_EPS
from seqrec.nn.sinkhorn import sinkhorn_backward, sinkhorn_kernel, sinkhorn_scalings

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
        kernel: how the connection runs; the maths is the same in all four (the tests check it):
            "native": C++ kernels for a float32 state on the CPU (seqrec.nn.mhc_native), one pass over the state per
            kernel, built on first use; elsewhere (a GPU, float16/bfloat16 mappings) the eager path below.
            "auto": "native" where those kernels build (a C++ compiler is present), else "eager".
            "compile": the read through torch.compile in training steps (seqrec.nn.mhc_compiled).
            "eager": PyTorch ops, one autograd node for the read (_MHCRead); runs anywhere.
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
        kernel: str = "eager",
    ):
        super().__init__()
        self.dim, self.streams, self.norm_first = dim, streams, norm_first
        self.sinkhorn_iters, self.fp32_mappings = sinkhorn_iters, fp32_mappings
        self.init_gate, self.kernel = init_gate, kernel
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
        """docs/MODELS.md (Eq. 19): read 1/S, unit write, identity-leaning doubly stochastic mix, small gates."""
        S = self.streams
        nn.init.normal_(self.phi, std=1.0 / math.sqrt(S * self.dim))
        b_pre = -math.log(S - 1) if S > 1 else LOGIT_ONE  # sigmoid(b_pre) = 1/S
        b_res = torch.eye(S) * self.res_diag_init
        with torch.no_grad():
            self.bias.copy_(torch.cat([torch.full((S,), b_pre), torch.zeros(S), b_res.flatten()]))
            self.alpha.fill_(self.init_gate)
        nn.init.ones_(self.gain)
        self.norm.reset_parameters()

    def fused_weight(self) -> Tensor:
        """phi with the RMSNorm gain (rows) and the gates alpha (columns) folded in: (S*D, 2S + S^2)."""
        S = self.streams
        gates = torch.cat([self.alpha[:2].repeat_interleave(S), self.alpha[2].expand(S * S)])  # (2S + S^2,)
        return self.phi * (self.gain[:, None] * gates)

    def forward(self, state: Tensor, sublayer: Callable[[Tensor], Tensor], keep: Tensor | None = None) -> Tensor:
        """(B, L, S, D) state -> (B, L, S, D); `sublayer` maps (B, L, D) -> (B, L, D) under the caller's autocast.

        Rows where the (B, L) `keep` is False/0 (padding) come out zero in every stream.
        """
        B, L, S, D = state.shape
        device = state.device.type
        # fp32_mappings=False under autocast: the two matmuls run in autocast's dtype, as autocast would run them
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        matmul_dtype = None if self.fp32_mappings else low
        state = state.float() if self.fp32_mappings else state
        native = self.kernel in ("auto", "native") and matmul_dtype is None
        if native and mhc_native.supports(state, S, self.sinkhorn_iters):
            return self._native_forward(state, sublayer, keep)  # reads any stream stride (MHC.expand's view)
        state = state.contiguous()
        read = None
        with torch.autocast(device, enabled=False):
            weight, bias = self.fused_weight().to(state.dtype), self.bias.to(state.dtype)
            if self.kernel == "compile" and matmul_dtype is None and torch.is_grad_enabled():  # no-grad: not worth it
                z = state.flatten(-2) @ weight  # (B, L, 2S + S^2); state and z are not views (dynamo guards those)
                # the bias per token, so that its gradient's sum over tokens runs outside the graph: inductor picks
                # its reduction kernel by the token count (> 4096 or not), which would mean two compilations
                token_bias = bias.expand(B, L, -1).contiguous()
                read = mhc_compiled.compiled_read(state, z, token_bias, self.sinkhorn_iters)
            if read is None:
                read = _MHCRead.apply(state.view(B * L, S, D), weight, bias, self.sinkhorn_iters, matmul_dtype)
            u, mixed, post, read_mix, mean_square = read
        # kept for MHC.diagnostics (no copy); all-zero tokens are padding
        self.last = {"read_mix": read_mix.view(B, L, 1 + S, S), "post": post.detach().view(B, L, S)}
        self.last["real"] = (mean_square > 0).view(B, L)
        out = sublayer((self.norm(u) if self.norm_first else u).view(B, L, D))  # (B, L, D)
        # write to every stream: X' = H_res X + H_post^T out, (B, L, S, D), a new tensor, not a view
        state = torch.addcmul(mixed.view(B, L, S, D), post.view(B, L, S, 1), out.view(B, L, 1, D).to(mixed.dtype))
        state = state if self.norm_first else self.norm(state)
        return state if keep is None else state * keep[..., None, None]

    def _native_forward(self, state: Tensor, sublayer: Callable[[Tensor], Tensor], keep: Tensor | None) -> Tensor:
        """forward() through the C++ kernels (seqrec.nn.mhc_native): float32 state on the CPU."""
        B, L, S, D = state.shape
        X = state.reshape(B * L, S, D)  # a view, also of the expanded embedding (stream stride 0)
        link = mhc_native.Link()
        with torch.autocast("cpu", enabled=False):
            u, maps, mean_square = mhc_native.read(X, self.fused_weight(), self.bias, self.sinkhorn_iters, link)
        # maps per token: [H_post | H_pre | H_res]; kept for MHC.diagnostics (no copy); all-zero tokens are padding
        self.last = {"read_mix": maps[:, S:].detach().view(B, L, 1 + S, S), "post": maps[:, :S].detach().view(B, L, S)}
        self.last["real"] = (mean_square > 0).view(B, L)
        out = sublayer((self.norm(u) if self.norm_first else u).view(B, L, D))  # (B, L, D)
        # Post-LN: the per-stream LayerNorm runs inside the write too, before the padding mask
        keep = None if keep is None else keep.reshape(B * L).to(X.dtype)
        out = out.reshape(B * L, D).to(X.dtype)
        with torch.autocast("cpu", enabled=False):
            state = mhc_native.write(X, maps, out, keep, link, norm=None if self.norm_first else self.norm)
        return state.view(B, L, S, D)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, streams={self.streams}, norm_first={self.norm_first}, iters={self.sinkhorn_iters}, "
            f"kernel={self.kernel}"
        )


class _MHCRead(torch.autograd.Function):
    """Everything an mHC connection does before its sublayer, as one autograd node (Eq. 7-9 and the read/mix).

    X (N, S, D) -> u = H_pre X (N, D), mixed = H_res X (N, S, D), H_post (N, S); also [H_pre; H_res] (N, 1 + S, S)
    and the mean square of each token's S*D vector (N,), both without gradient, for diagnostics.

    Fused form of Eq. 7-9 (as the paper's kernels): RMSNorm gain and gates are folded into the weight, the matmul
    runs on the un-normalised flattened state and is scaled by 1/RMS afterwards (equal to RMSNorm, then matmul).
    The logits are computed transposed, tokens last, so that sigmoid and Sinkhorn work on contiguous per-token
    vectors. Written by hand rather than left to autograd, which (i) kept the bmm's whole (N, 1 + S, D) output alive
    behind the views u and mixed, plus the RMS intermediates and the transposed mappings, and (ii) spent many extra
    passes on the gradients of slices and transposes (~2x the time of this version). Here the backward keeps X
    (also kept by the next connection), the logits before the bias (2S + S^2 per token), 1/RMS and [H_pre; H_res],
    and recomputes the sigmoids and the Sinkhorn iterates. The gradient of X is one bmm plus one matmul
    accumulated into the bmm's output buffer, and the RMS term of the gradient is a single rank-1 correction.
    """

    @staticmethod
    def forward(ctx, X: Tensor, weight: Tensor, bias: Tensor, iters: int, matmul_dtype: torch.dtype | None):
        N, S, D = X.shape
        x = X.view(N, S * D)
        mean_square = torch.linalg.vector_norm(x, dim=1).square_().div_(S * D)  # (N,), one pass over x
        rstd = (mean_square + RMS_EPS).rsqrt_()  # (N,)
        z = _mm(weight.t(), x.t(), matmul_dtype)  # (2S + S^2, N): tokens last
        logits = torch.addcmul(bias[:, None], z, rstd)  # (2S + S^2, N)
        gates = torch.sigmoid(logits[: 2 * S])  # (2S, N): H_pre, H_post / 2
        K, _ = sinkhorn_kernel(logits[2 * S :].view(S, S, N))
        us, vs = sinkhorn_scalings(K, iters)  # (iters + 1, S, N), (iters, S, N)
        res = K.mul_(us[-1, :, None]).mul_(vs[-1, None])  # (S, S, N) = diag(u) K diag(v), H_res per token
        # [H_pre; H_res] tokens first, contiguous: the batched matmul takes a per-token slow path on strided operands
        read_mix = X.new_empty(N, 1 + S, S)
        columns = read_mix.view(N, (1 + S) * S).t()  # (S + S^2, N) view
        columns[:S] = gates[:S]
        columns[S:] = res.view(S * S, N)
        post = gates[S:].t().mul(2)  # (N, S), contiguous
        # one batched matmul does the read (row 0: H_pre X) and the mixing (rows 1..S: H_res X): (N, 1 + S, D)
        read = _mm(read_mix, X, matmul_dtype)
        u = read[:, 0].contiguous()  # a copy, so the sublayer's LayerNorm does not keep all of `read` alive
        mixed = read[:, 1:]  # (N, S, D) view; consumed by the write-back, which does not keep it
        # the Sinkhorn iterates (~165 floats per token at S = 4) are recomputed in the backward instead of kept:
        # kept, they took peak RSS from 1.22x to 1.30x plain on ML-1M, for ~3 % of the step time
        ctx.save_for_backward(X, weight, bias, z, rstd, read_mix)
        ctx.iters, ctx.matmul_dtype = iters, matmul_dtype
        ctx.mark_non_differentiable(read_mix, mean_square)
        ctx.set_materialize_grads(False)
        return u, mixed, post, read_mix, mean_square

    @staticmethod
    def backward(ctx, grad_u, grad_mixed, grad_post, _grad_read_mix, _grad_mean_square):
        X, weight, bias, z, rstd, read_mix = ctx.saved_tensors
        N, S, D = X.shape
        C = z.shape[0]  # 2S + S^2
        # read/mix: d X = [H_pre; H_res]^T d read, d [H_pre; H_res] = d read X^T, d read = [d u; d mixed]
        grad_read = X.new_zeros(N, 1 + S, D) if grad_u is None or grad_mixed is None else X.new_empty(N, 1 + S, D)
        if grad_u is not None:
            grad_read[:, 0] = grad_u
        if grad_mixed is not None:
            grad_read[:, 1:] = grad_mixed
        grad_X = _mm(read_mix.transpose(1, 2), grad_read, ctx.matmul_dtype)  # (N, S, D)
        grad_columns = _mm(grad_read, X.transpose(1, 2), ctx.matmul_dtype).view(N, (1 + S) * S).t()  # (S+S^2, N)
        # mappings: recompute the logits, the sigmoids and the Sinkhorn iterates
        logits = torch.addcmul(bias[:, None], z, rstd)  # (C, N)
        grad_logits = z.new_empty(C, N)
        gates = torch.sigmoid(logits[: 2 * S])
        torch.ops.aten.sigmoid_backward(grad_columns[:S], gates[:S], grad_input=grad_logits[:S])
        if grad_post is None:
            grad_logits[S : 2 * S] = 0
        else:
            torch.ops.aten.sigmoid_backward(grad_post.t() * 2, gates[S:], grad_input=grad_logits[S : 2 * S])
        K, floored = sinkhorn_kernel(logits[2 * S :].view(S, S, N))
        us, vs = sinkhorn_scalings(K, ctx.iters)
        grad_res = grad_columns[S:].reshape(S, S, N)  # one transposing copy
        grad_logits[2 * S :] = sinkhorn_backward(grad_res, K, floored, us, vs).view(S * S, N)
        # logits = rstd * (W^T x) + b, rstd = (|x|^2 / (S D) + eps)^-1/2: d rstd / d x = -rstd^3 x / (S D)
        grad_z = grad_logits * rstd  # (C, N)
        x = X.view(N, S * D)
        grad_weight = _mm(x.t(), grad_z.t(), ctx.matmul_dtype)  # (S*D, C)
        grad_rstd = (grad_logits * z).sum(dim=0)  # (N,)
        grad_x = grad_X.view(N, S * D).addmm_(grad_z.t(), weight.t().to(grad_X.dtype))
        grad_x.addcmul_(x, (grad_rstd * rstd.pow(3)).div_(-S * D)[:, None])
        return grad_x.view(N, S, D), grad_weight, grad_logits.sum(dim=1), None, None


def _mm(a: Tensor, b: Tensor, dtype: torch.dtype | None) -> Tensor:
    """a @ b (2-D, or batched 3-D), in `dtype` if given (autocast's, for fp32_mappings=False), the result in a's
    dtype."""
    return a @ b if dtype is None else (a.to(dtype) @ b.to(dtype)).to(a.dtype)
