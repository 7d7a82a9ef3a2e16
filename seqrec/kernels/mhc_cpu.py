"""mHC's connection on the CPU as C++ kernels (mhc_cpu.cpp), built on first use and called through ctypes.

The plug-in for operation "mhc" on device type "cpu" (seqrec.kernels); the maths is the reference
seqrec.nn.residual.MHCConnection's, and tests/unit/test_kernels.py checks values and gradients against it.

One connection is two autograd nodes around its sublayer: `read` (X -> u = H_pre X and the per-token mappings)
and `write` (X, mappings, sublayer output -> X' = (H_res X + H_post^T out) * keep, with Post-LN's per-stream
LayerNorm before the keep). Each kernel visits a token's S x D state once (see mhc_cpu.cpp for why that is
what matters at small D). X may be a stride-0 view over the streams (MHC.expand's), read as it is.

The two nodes share one gradient: d loss / d X through the write, H_res^T dX', is not formed by the write's
backward (autograd would then add it to the read's part, two more passes over the state) but by the read's
backward, which reads dX' from the `Link` the write left it (and writes dX over that buffer when it made it). This
is exact because the write consumes the read's mappings, so autograd always runs the write's backward first; it
does not support double backward.

The library is compiled with the system C++ compiler (~20 s) into the private, verified kernel cache of
seqrec.kernels.cache. The ABI is plain pointers and sizes (no torch headers: a build with
torch.utils.cpp_extension took longer and its cache loads whatever library its directory holds). Without a
compiler `library()` is None (one warning) and mHC runs the reference layer.
"""

from __future__ import annotations

import ctypes
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from seqrec.kernels import Kernel
from seqrec.kernels.cache import BuildError, load_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("mhc_cpu.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC"]
MAX_STREAMS, MAX_ITERS = 8, 64  # mhc_cpu.cpp instantiates S = 1..8; its MAX_ITERS
TOKENS_PER_TASK = 512  # the least work worth a thread
LANES = 16  # mhc_cpu.cpp's PAD: W, W^T and d W are read zero-padded to a multiple of it

_i64, _int, _ptr, _float = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
_SIGNATURES = {
    "mhc_read_forward": [_i64, _i64, _int, _int, _int, _ptr, _i64, _i64] + [_ptr] * 7,
    "mhc_write_forward": [_i64, _i64, _int, _int, _ptr, _i64, _i64] + [_ptr] * 5 + [_float, _ptr, _ptr],
    "mhc_write_backward": [_i64, _i64, _int, _int, _ptr, _i64, _i64] + [_ptr] * 4 + [_i64, _i64] + [_ptr] * 6,
    "mhc_read_backward": [_i64, _i64, _int, _int, _int, _ptr, _i64, _i64, _ptr, _int]
    + [_ptr] * 7
    + [_i64, _i64, _ptr, _ptr, _ptr, _ptr],
}


@cache
def library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning) where they cannot be built or loaded; `extra_flags` go to
    the compiler after FLAGS (the tests build other vector widths with -DSEQREC_MHC_LANES=4|8|16)."""
    try:
        lib = load_library("mhc_cpu", SOURCE, [*FLAGS, *extra_flags])
        for name, argtypes in _SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = None
    except (BuildError, AttributeError) as error:
        log.warning("mHC: the C++ kernels are unavailable (%s); using the reference layer", str(error)[:300])
        return None
    return lib


def supports(connection, state: Tensor) -> bool:
    """Whether the kernels can run this connection: a float32 state (or fp32 mappings) on the CPU, S <= 8,
    iters <= 64, no low-precision mapping matmuls, and the library built."""
    low_precision_maps = not connection.fp32_mappings and (
        state.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
    )
    return (
        state.device.type == "cpu"
        and not low_precision_maps
        and connection.streams <= MAX_STREAMS
        and 1 <= connection.sinkhorn_iters <= MAX_ITERS
        and library() is not None
    )


def fused_weight(connection) -> Tensor:
    """phi with the RMSNorm gain (rows) and the gates alpha (columns) folded in: (S*D, 2S + S^2).

    RMSNorm(x) phi scaled per column by alpha = (x phi') / RMS(x) with phi' = diag(gain) phi diag(gates), so the
    kernel runs the matmul on the raw state and scales each token's logits by 1/RMS afterwards."""
    S, alpha = connection.streams, connection.alpha
    gates = torch.cat([alpha[:2].repeat_interleave(S), alpha[2].expand(S * S)])  # (2S + S^2,)
    return connection.phi * (connection.gain[:, None] * gates)


def forward(connection, state: Tensor, sublayer, keep: Tensor | None) -> Tensor:
    """MHCConnection.forward through the kernels: (B, L, S, D) state -> (B, L, S, D)."""
    B, L, S, D = state.shape
    X = state.float().reshape(B * L, S, D)  # a view, also of the expanded embedding (stream stride 0)
    link = Link()
    with torch.autocast("cpu", enabled=False):
        u, maps, mean_square = read(X, fused_weight(connection), connection.bias, connection.sinkhorn_iters, link)
    # maps per token: [H_post | H_pre | H_res]; kept for MHC.diagnostics (no copy); all-zero tokens are padding
    maps_ = maps.detach().view(B, L, 2 + S, S)
    connection.last = {"post": maps_[:, :, 0], "pre": maps_[:, :, 1], "res": maps_[:, :, 2:]}
    connection.last["real"] = (mean_square > 0).view(B, L)
    norm = connection.norm
    out = sublayer((norm(u) if connection.norm_first else u).view(B, L, D))  # (B, L, D)
    # Post-LN: the per-stream LayerNorm runs inside the write too, before the padding mask
    keep = None if keep is None else keep.reshape(B * L).to(X.dtype)
    out = out.reshape(B * L, D).to(X.dtype)
    with torch.autocast("cpu", enabled=False):
        state = write(X, maps, out, keep, link, norm=None if connection.norm_first else norm)
    return state.view(B, L, S, D)


@cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mhc")


def _tasks(N: int) -> int:
    return max(1, min(torch.get_num_threads(), -(-N // TOKENS_PER_TASK)))


_NONE = object()


def _run(kernel: str, N: int, *args, per_task=_NONE) -> None:
    """kernel(n0, n1, *args[, per_task[i]]) over the N tokens in _tasks(N) parallel tasks (ctypes drops the GIL);
    task i gets its own slice of `per_task` (an accumulator, or None: a null pointer) as the last argument."""
    fn = getattr(library(), kernel)
    # `args` keeps the tensors alive (some are temporaries) until the kernels have run
    pointers = [a.data_ptr() if isinstance(a, Tensor) else a for a in args]
    tasks = _tasks(N)
    step = -(-N // tasks // 64) * 64  # whole 64-token blocks per task
    bounds = [(n, min(n + step, N)) for n in range(0, N, step)]
    extra = [
        [] if per_task is _NONE else [None if per_task is None else per_task[i].data_ptr()] for i in range(len(bounds))
    ]
    if len(bounds) == 1:
        fn(0, N, *pointers, *extra[0])
        return
    calls = [(lo, hi, *pointers, *more) for (lo, hi), more in zip(bounds, extra)]
    list(_pool(torch.get_num_threads()).map(lambda call: fn(*call), calls))


def _reusable(grad: Tensor | None, X: Tensor) -> bool:
    """Whether a backward may write over `grad`: a contiguous buffer of X's shape made by this module, or a whole view
    of one (autograd hands the next connection's dX to this one's write through the views between them)."""
    if grad is None or grad.shape != X.shape or not grad.is_contiguous():
        return False
    whole = grad._base if grad._base is not None and grad._base.numel() == grad.numel() else grad
    return whole.data_ptr() == grad.data_ptr() and getattr(whole, "_mhc_owned", False)


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strided(t: Tensor | None) -> tuple:
    """(N, S, D) tensor -> (it, token stride, stream stride) for the kernels; None -> (None, 0, 0)."""
    return (None, 0, 0) if t is None else (t, t.stride(0), t.stride(1))


def _padded(matrix: Tensor, multiple: int) -> Tensor:
    """(R, K) -> (R, K rounded up to `multiple`), zero columns added, contiguous."""
    rows, cols = matrix.shape
    out = matrix.new_zeros(rows, -(-cols // multiple) * multiple)
    out[:, :cols] = matrix
    return out


class Link:
    """What the write's backward hands the read's backward: keep * dX' (N, S, D) is the state's gradient there."""

    def __init__(self):
        self.grad: Tensor | None = None
        self.keep: Tensor | None = None


class _Read(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X: Tensor, weight: Tensor, bias: Tensor, iters: int, link: Link):
        N, S, D = X.shape
        C = 2 * S + S * S
        u, maps, mean_square = X.new_empty(N, D), X.new_empty(N, C), X.new_empty(N)
        # z and 1/RMS only serve the backward: an evaluation pass (no gradient anywhere) does not write them
        needed = any(ctx.needs_input_grad)
        z, rstd = (X.new_empty(N, C), X.new_empty(N)) if needed else (None, None)
        weight_padded = _padded(weight, LANES)
        _run("mhc_read_forward", N, S, D, iters, *_strided(X), weight_padded, bias, u, maps, z, rstd, mean_square)
        ctx.save_for_backward(X, weight, bias, z, rstd, maps)
        ctx.iters, ctx.link = iters, link
        ctx.mark_non_differentiable(mean_square)
        ctx.set_materialize_grads(False)
        return u, maps, mean_square

    @staticmethod
    def backward(ctx, grad_u, grad_maps, _grad_mean_square):
        X, weight, bias, z, rstd, maps = ctx.saved_tensors
        link_grad, link_keep = ctx.link.grad, ctx.link.keep
        ctx.link.grad = ctx.link.keep = None
        N, S, D = X.shape
        grad_u = None if grad_u is None else grad_u.contiguous()
        grad_maps = None if grad_maps is None else grad_maps.contiguous()
        # dX goes into the buffer of d X' (this connection's output gradient, which the read backward of the next
        # connection allocated and nothing else holds): its rows are in cache as they are read, and no new 10 MB
        grad_X = link_grad if _reusable(link_grad, X) else X.new_empty(X.shape)
        grad_logits = torch.empty_like(z)
        weight_t = _padded(weight.t(), LANES)
        C = weight.shape[1]
        grad_weight = weight.new_zeros(_tasks(N), S * D, -(-C // LANES) * LANES)  # one accumulator per task
        _run(
            "mhc_read_backward", N, S, D, ctx.iters, *_strided(X), weight_t, weight_t.shape[1], bias, z, rstd, maps,
            grad_u, grad_maps, *_strided(link_grad), link_keep, grad_X, grad_logits, per_task=grad_weight,
        )  # fmt: skip
        grad_X._mhc_owned = True  # the previous connection's read backward may write over it
        return grad_X, grad_weight.sum(dim=0)[:, :C], grad_logits.sum(dim=0), None, None


class _Write(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, maps, out, keep, link, norm_weight, norm_bias, eps):
        N, S, D = X.shape
        X_new = X.new_empty(X.shape)  # contiguous, whatever X's strides
        # Post-LN: each stream's LayerNorm mean and 1/std (N, S, 2), so that the backward need not recompute them
        post_ln_training = norm_weight is not None and any(ctx.needs_input_grad)
        stats = X.new_empty(N, S, 2) if post_ln_training else None
        _run("mhc_write_forward", N, S, D, *_strided(X), maps, out, keep, norm_weight, norm_bias, eps, X_new, stats)
        ctx.save_for_backward(X, maps, out, keep, norm_weight, stats)
        ctx.link = link
        return X_new

    @staticmethod
    def backward(ctx, grad):
        X, maps, out, keep, norm_weight, stats = ctx.saved_tensors
        N, S, D = X.shape
        grad = _unit_last_stride(grad)  # a stride-0 stream dim (from the sum readout) is read as it is
        grad_out, grad_maps = torch.empty_like(out), maps.new_empty(maps.shape)
        post_ln = norm_weight is not None
        grad_pre_norm = None
        if post_ln:  # the gradient before the LayerNorm goes over dX' where this module made that buffer
            grad_pre_norm = grad if _reusable(grad, X) else X.new_empty(X.shape)
            grad_pre_norm._mhc_owned = True
        grad_norm = X.new_zeros(_tasks(N), 2, D) if post_ln else None  # d weight, d bias per task
        _run(
            "mhc_write_backward", N, S, D, *_strided(X), maps, out, keep, *_strided(grad), norm_weight, stats,
            grad_out, grad_maps, grad_pre_norm, per_task=grad_norm,
        )  # fmt: skip
        # the read's backward adds H_res^T (keep dX', or the gradient before the LayerNorm, keep included) to dX
        ctx.link.grad, ctx.link.keep = (grad_pre_norm, None) if post_ln else (grad, keep)
        grad_weight, grad_bias = grad_norm.sum(dim=0).unbind(0) if post_ln else (None, None)
        return None, grad_maps, grad_out, None, None, grad_weight, grad_bias, None


def read(X: Tensor, weight: Tensor, bias: Tensor, iters: int, link: Link) -> tuple[Tensor, Tensor, Tensor]:
    """(N, S, D) state -> u = H_pre X (N, D), maps [H_post | H_pre | H_res] (N, 2S + S^2), mean square (N,).

    X may have any token and stream strides (an expanded embedding, stride 0 over the streams, is read as it is)
    as long as D is contiguous."""
    return _Read.apply(_unit_last_stride(X), weight.contiguous(), bias.contiguous(), iters, link)


def write(
    X: Tensor, maps: Tensor, out: Tensor, keep: Tensor | None, link: Link, norm: torch.nn.LayerNorm | None = None
) -> Tensor:
    """X' = (H_res X + H_post^T out) * keep, or LN(H_res X + H_post^T out) * keep with `norm` (Post-LN, applied to
    each stream), (N, S, D); keep (N,) float or None."""
    if norm is None:
        return _Write.apply(X, maps, out.contiguous(), keep, link, None, None, 0.0)
    return _Write.apply(X, maps, out.contiguous(), keep, link, norm.weight, norm.bias, norm.eps)


MHC = Kernel(run=forward, supports=supports)
