"""mHC's connection on CUDA as Triton kernels: the plug-in for operation "mhc" on device type "cuda".

NOT YET RUN ON A REAL GPU. The kernels are checked only through Triton's interpreter on the CPU
(tests/unit/test_mhc_triton.py, TRITON_INTERPRET=1), for values and gradients against the reference
seqrec.nn.residual.MHCConnection; tests/test_gpu.py::test_mhc_triton_matches_reference_on_cuda repeats the check
on the first GPU. Until that has passed, and its speed has been measured, `kernels=reference` is the safe choice on
CUDA.

As a guard until then, `supports` runs `self_check` once per (S, D, LayerNorm placement, device) in a process: the
kernels on a few tokens against the reference; if they fail to compile or disagree, one warning, and the reference
layer runs.

One connection is two autograd nodes around its sublayer, as in the CPU plug-in (mhc_cpu.py):

    read   X (N, S, D) -> u = H_pre X (N, D), maps [H_post | H_pre | H_res] (N, 2S + S^2)
    write  X, maps, out (N, D) -> X' = (H_res X + H_post^T out) keep, or LN(H_res X + H_post^T out) keep (Post-LN,
           the LayerNorm per stream over D)

The mapping matmul runs on the raw state with phi's rows scaled by the RMSNorm gain and its columns by the gates
(`fused_weight`): logits = rstd (X W) + b, rstd = (|X|^2 / (S D) + eps)^-1/2, the same maths as RMSNorm(X) phi
scaled by the gates. That matmul, its two backward matmuls and the bias gradient's column sum are cuBLAS/torch
calls; everything per token (RMS, sigmoids, Sinkhorn and its reverse, the reads, the writes, the LayerNorm, the
padding mask) runs in the Triton kernels below, on blocks of tokens, with the S x S Sinkhorn in registers.

Sinkhorn: K = exp(max(l - column max, -FLOOR)), then `iters` rounds of v = 1 / K^T u, u = 1 / K v (the reference's
column-then-row normalising, written as scalings), H_res = diag(u) K diag(v). The forward saves u and v of every
round when a gradient is needed; the backward differentiates the unrolled rounds in reverse from them.
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl
from torch import Tensor

from seqrec.kernels import Kernel
from seqrec.kernels.mhc_cpu import fused_weight
from seqrec.nn.residual import RMS_EPS, SINKHORN_FLOOR

log = logging.getLogger(__name__)

MAX_STREAMS = 8  # the S x S Sinkhorn is held in registers
MAX_DIM = 4096  # one token's D values of one stream are held in registers
BLOCK_ELEMENTS = 4096  # about how many floats a program holds in one (tokens, streams, D) tile


def supports(connection, state: Tensor) -> bool:
    """Whether the kernels can run this connection: CUDA, S <= 8, D <= MAX_DIM, float32 mapping maths (a float32
    state, or fp32_mappings; low-precision mapping matmuls, fp32_mappings=False under autocast, are left to the
    reference), and the kernels, compiled for this S, D and LayerNorm placement, passed `self_check` here."""
    low_precision_maps = not connection.fp32_mappings and (
        state.dtype != torch.float32 or torch.is_autocast_enabled(state.device.type)
    )
    return (
        state.device.type == "cuda"
        and state.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and not low_precision_maps
        and connection.streams <= MAX_STREAMS
        and connection.dim <= MAX_DIM
        and connection.sinkhorn_iters >= 1
        and verified(connection.streams, connection.dim, connection.norm_first, state.device)
    )


@functools.cache
def verified(streams: int, dim: int, norm_first: bool, device: torch.device) -> bool:
    """self_check once per shape and device in a process; False (one warning) where it fails: the reference runs."""
    try:
        problem = self_check(streams, dim, norm_first, device)
    except Exception as error:  # the check itself could not run there (no memory, a driver error): do not trust it
        problem = f"{type(error).__name__}: {str(error)[:300]}"
    if problem is not None:
        log.warning("mHC: the Triton kernels failed their check on %s (%s); using the reference layer", device, problem)
    return problem is None


def self_check(streams: int, dim: int, norm_first: bool, device: torch.device, tolerance: float = 1e-2) -> str | None:
    """Run the kernels once on a few padded tokens against the reference connection (values and every gradient);
    None if they agree, else what went wrong (a compile error, a mismatch). The tolerance is loose on purpose (TF32
    matmuls may be on): it is there to catch a kernel that does not compile or computes something else, before a
    run trains on it. The caller's random state, autocast and gradient mode are left as they were."""
    from seqrec import kernels  # the module, for its reference switch
    from seqrec.nn.residual import LN_EPS, MHCConnection

    devices = [device] if device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=devices),
        torch.inference_mode(False),  # gradients, even when the first call comes from an inference-mode pass
        torch.enable_grad(),
        torch.autocast(device.type, enabled=False),
    ):
        torch.manual_seed(0)
        connection = MHCConnection(dim, norm_first, streams=streams, sinkhorn_iters=4, init_gate=0.5,
                                   res_diag_init=None, fp32_mappings=True, ln_eps=LN_EPS).to(device)  # fmt: skip
        state = torch.randn(2, 37, streams, dim, device=device)
        keep = torch.ones(2, 37, dtype=torch.bool, device=device)
        keep[0, :5] = False
        state[~keep] = 0
        weight = torch.randn_like(state)
        results = []
        for run in (connection, lambda *args: forward(connection, *args)):
            x = state.clone().requires_grad_()
            connection.zero_grad()
            try:
                with kernels.using("reference"):
                    out = run(x, torch.tanh, keep)
                    (out * weight).sum().backward()
            except Exception as error:  # a compile or launch error: whatever type triton raises
                return f"{type(error).__name__}: {str(error)[:300]}"
            results.append([out.detach(), x.grad] + [p.grad.clone() for p in connection.parameters()])
    names = ["output", "state"] + [f"{name}'s gradient" for name, _ in connection.named_parameters()]
    for name, reference, plugin in zip(names, *results):
        error = ((plugin - reference).abs().max() / reference.abs().max().clamp_min(1e-6)).item()
        if not error <= tolerance:
            return f"{name} differs from the reference's by {error:.2g} (relative)"
    return None


def forward(connection, state: Tensor, sublayer, keep: Tensor | None) -> Tensor:
    """MHCConnection.forward through the kernels: (B, L, S, D) state -> (B, L, S, D)."""
    B, L, S, D = state.shape
    X = state.float().reshape(B * L, S, D)  # a view where it can be (the expanded embedding: stream stride 0)
    device = state.device.type
    with torch.autocast(device, enabled=False):
        u, maps, maxabs = _Read.apply(X, fused_weight(connection), connection.bias, connection.sinkhorn_iters)
    maps_ = maps.detach().view(B, L, 2 + S, S)  # per token [H_post | H_pre | H_res], kept for MHC.diagnostics
    connection.last = {"post": maps_[:, :, 0], "pre": maps_[:, :, 1], "res": maps_[:, :, 2:]}
    connection.last["real"] = (maxabs > 0).view(B, L)  # all-zero tokens are padding
    norm = connection.norm
    out = sublayer((norm(u) if connection.norm_first else u).view(B, L, D))  # (B, L, D), under the caller's autocast
    keep = None if keep is None else keep.reshape(B * L).to(torch.float32)
    out = out.reshape(B * L, D).to(torch.float32)
    with torch.autocast(device, enabled=False):
        if connection.norm_first:
            new = _Write.apply(X, maps, out, keep, None, None, 0.0)
        else:
            new = _Write.apply(X, maps, out, keep, norm.weight, norm.bias, norm.eps)
    return new.view(B, L, S, D)


def _tiles(S: int, D: int) -> tuple[int, int, int]:
    """(tokens per program, streams padded, D padded), each a power of two as tl.arange needs."""
    SP, DP = triton.next_power_of_2(S), triton.next_power_of_2(D)
    BT = max(1, min(64, BLOCK_ELEMENTS // (SP * max(DP, SP))))
    return 1 << (BT.bit_length() - 1), SP, DP


def _grid(N: int, BT: int) -> tuple[int]:
    return (triton.cdiv(N, BT),)


@triton.jit
def _logits(z_ptr, b_ptr, rstd, tok, tok_ok, S: tl.constexpr, SP: tl.constexpr):
    """logits = rstd z + b of one token block, in registers: pre, post (BT, SP), res (BT, SP, SP); zero outside S."""
    C: tl.constexpr = 2 * S + S * S
    s = tl.arange(0, SP)[None, :]
    s_ok = (s < S) & tok_ok[:, None]
    i3 = tl.arange(0, SP)[None, :, None]
    j3 = tl.arange(0, SP)[None, None, :]
    r_ok = (i3 < S) & (j3 < S) & tok_ok[:, None, None]
    r2 = rstd[:, None]
    pre = tl.load(z_ptr + tok[:, None] * C + s, mask=s_ok, other=0.0) * r2 + tl.load(b_ptr + s, mask=s < S, other=0.0)
    post = tl.load(z_ptr + tok[:, None] * C + S + s, mask=s_ok, other=0.0) * r2
    post += tl.load(b_ptr + S + s, mask=s < S, other=0.0)
    res = tl.load(z_ptr + tok[:, None, None] * C + 2 * S + i3 * S + j3, mask=r_ok, other=0.0) * rstd[:, None, None]
    res += tl.load(b_ptr + 2 * S + i3 * S + j3, mask=(i3 < S) & (j3 < S), other=0.0)
    return pre, post, res


@triton.jit
def _sinkhorn_kernel_matrix(logit, valid, FLOOR):
    """K (BT, SP, SP) = exp(max(l - column max, -FLOOR)) of the res logits, 0 outside `valid` (S x S); `open` is 1
    where the floor is not active (the logit gets gradient)."""
    colmax = tl.max(tl.where(valid, logit, -float("inf")), axis=1)  # (BT, SP)
    shifted = logit - colmax[:, None, :]
    K = tl.where(valid, tl.exp(tl.maximum(shifted, -FLOOR)), 0.0)
    open_ = tl.where(valid & (shifted >= -FLOOR), 1.0, 0.0)
    return K, open_


@triton.jit
def _reciprocal_in(sums, valid):
    """1 / sums where valid, 0 in the padding streams (whose sums are 0)."""
    return tl.where(valid, 1.0 / tl.where(valid, sums, 1.0), 0.0)


@triton.jit
def _read_forward_kernel(
    X_ptr, xt, xs, z_ptr, b_ptr, rstd_ptr, u_ptr, maps_ptr, maxabs_ptr, us_ptr, vs_ptr, N, D, iters, eps, FLOOR,
    S: tl.constexpr, SP: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr, SAVE: tl.constexpr,
):  # fmt: skip
    """rstd, max |X|, maps [H_post | H_pre | H_res] and u = H_pre X of a block of BT tokens; with SAVE, the Sinkhorn
    scalings u_0..u_T (N, T + 1, SP) and v_1..v_T (N, T, SP) for the backward. Nothing stored here is read back."""
    C: tl.constexpr = 2 * S + S * S
    tok = tl.program_id(0) * BT + tl.arange(0, BT)  # (BT,)
    tok_ok = tok < N
    d = tl.arange(0, DP)[None, :]
    s = tl.arange(0, SP)[None, :]  # stream index as a (1, SP) row
    s_ok = (s < S) & tok_ok[:, None]
    xmask = tok_ok[:, None] & (d < D)
    i3 = tl.arange(0, SP)[None, :, None]
    j3 = tl.arange(0, SP)[None, None, :]
    r_valid = (i3 < S) & (j3 < S)
    # |X|^2 and max |X| over the S*D state
    sumsq = tl.zeros((BT,), tl.float32)
    maxabs = tl.zeros((BT,), tl.float32)
    for j in tl.static_range(S):
        xj = tl.load(X_ptr + tok[:, None] * xt + j * xs + d, mask=xmask, other=0.0)
        sumsq += tl.sum(xj * xj, axis=1)
        maxabs = tl.maximum(maxabs, tl.max(tl.abs(xj), axis=1))
    rstd = 1.0 / tl.sqrt(sumsq / (S * D) + eps)
    tl.store(rstd_ptr + tok, rstd, mask=tok_ok)
    tl.store(maxabs_ptr + tok, maxabs, mask=tok_ok)
    logit_pre, logit_post, logit_res = _logits(z_ptr, b_ptr, rstd, tok, tok_ok, S, SP)
    pre = tl.where(s < S, tl.sigmoid(logit_pre), 0.0)  # (BT, SP)
    tl.store(maps_ptr + tok[:, None] * C + s, 2.0 * tl.sigmoid(logit_post), mask=s_ok)
    tl.store(maps_ptr + tok[:, None] * C + S + s, pre, mask=s_ok)
    # Sinkhorn: v = 1 / K^T u, u = 1 / K v, `iters` rounds from u = 1
    K, open_ = _sinkhorn_kernel_matrix(logit_res, r_valid, FLOOR)
    u = tl.where(s < S, 1.0, 0.0) + tl.zeros((BT, SP), tl.float32)
    v = tl.zeros((BT, SP), tl.float32)
    if SAVE:
        tl.store(us_ptr + tok[:, None] * (iters + 1) * SP + s, u, mask=tok_ok[:, None])
    for k in range(iters):
        v = _reciprocal_in(tl.sum(K * u[:, :, None], axis=1), s < S)
        u = _reciprocal_in(tl.sum(K * v[:, None, :], axis=2), s < S)
        if SAVE:
            tl.store(vs_ptr + (tok[:, None] * iters + k) * SP + s, v, mask=tok_ok[:, None])
            tl.store(us_ptr + (tok[:, None] * (iters + 1) + k + 1) * SP + s, u, mask=tok_ok[:, None])
    res = u[:, :, None] * K * v[:, None, :]  # (BT, SP, SP)
    tl.store(maps_ptr + tok[:, None, None] * C + 2 * S + i3 * S + j3, res, mask=r_valid & tok_ok[:, None, None])
    # u = H_pre X: one stream at a time, its read weight a column of `pre`
    acc = tl.zeros((BT, DP), tl.float32)
    for j in tl.static_range(S):
        xj = tl.load(X_ptr + tok[:, None] * xt + j * xs + d, mask=xmask, other=0.0)
        acc += tl.sum(tl.where(s == j, pre, 0.0), axis=1)[:, None] * xj
    tl.store(u_ptr + tok[:, None] * D + d, acc, mask=xmask)


@triton.jit
def _read_backward_kernel(
    X_ptr, xt, xs, z_ptr, b_ptr, rstd_ptr, maps_ptr, us_ptr, vs_ptr, gu_ptr, gmaps_ptr, gl_ptr, gz_ptr, gX_ptr,
    N, D, iters, FLOOR,
    S: tl.constexpr, SP: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr, HAS_GU: tl.constexpr,
    HAS_GMAPS: tl.constexpr,
):  # fmt: skip
    """d logits (gl), d z = rstd d logits (gz), and dX without the d z W^T term (the caller adds it):
    dX_j = H_pre,j du - rstd^3 / (S D) (d logits . z) X_j."""
    C: tl.constexpr = 2 * S + S * S
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    tok_ok = tok < N
    d = tl.arange(0, DP)[None, :]
    s = tl.arange(0, SP)[None, :]
    s_ok = (s < S) & tok_ok[:, None]
    xmask = tok_ok[:, None] & (d < D)
    i3 = tl.arange(0, SP)[None, :, None]
    j3 = tl.arange(0, SP)[None, None, :]
    rmask = (i3 < S) & (j3 < S) & tok_ok[:, None, None]
    if HAS_GU:
        gu = tl.load(gu_ptr + tok[:, None] * D + d, mask=xmask, other=0.0)
    # H_pre = sigma(l): d l = (du . X_j) sigma (1 - sigma)
    gl_pre = tl.zeros((BT, SP), tl.float32)
    if HAS_GU:
        for j in tl.static_range(S):
            xj = tl.load(X_ptr + tok[:, None] * xt + j * xs + d, mask=xmask, other=0.0)
            gpj = tl.sum(gu * xj, axis=1)  # (BT,)
            gl_pre += tl.where(s == j, gpj[:, None], 0.0)
    pre = tl.load(maps_ptr + tok[:, None] * C + S + s, mask=s_ok, other=0.0)
    gl_pre = gl_pre * pre * (1.0 - pre)
    gl_post = tl.zeros((BT, SP), tl.float32)
    gl_res = tl.zeros((BT, SP, SP), tl.float32)
    if HAS_GMAPS:
        # H_post = p = 2 sigma(l): d l = d p p (1 - p / 2)
        post = tl.load(maps_ptr + tok[:, None] * C + s, mask=s_ok, other=0.0)
        gl_post = tl.load(gmaps_ptr + tok[:, None] * C + s, mask=s_ok, other=0.0) * post * (1.0 - 0.5 * post)
        # Sinkhorn in reverse, from H_res = diag(u_T) K diag(v_T)
        rstd = tl.load(rstd_ptr + tok, mask=tok_ok, other=1.0)
        _, _, logit_res = _logits(z_ptr, b_ptr, rstd, tok, tok_ok, S, SP)
        K, open_ = _sinkhorn_kernel_matrix(logit_res, (i3 < S) & (j3 < S), FLOOR)
        gM = tl.load(gmaps_ptr + tok[:, None, None] * C + 2 * S + i3 * S + j3, mask=rmask, other=0.0)
        smask = tok_ok[:, None]
        u = tl.load(us_ptr + (tok[:, None] * (iters + 1) + iters) * SP + s, mask=smask, other=0.0)
        v = tl.load(vs_ptr + (tok[:, None] * iters + iters - 1) * SP + s, mask=smask, other=0.0)
        gMK = gM * K
        gu_s = tl.sum(gMK * v[:, None, :], axis=2)  # (BT, SP) d u_T
        gv_direct = tl.sum(gMK * u[:, :, None], axis=1)  # d v_T through H_res itself
        gK = gM * u[:, :, None] * v[:, None, :]
        for kk in range(iters):
            k = iters - kk  # round k: v_k = 1 / K^T u_(k-1), u_k = 1 / K v_k
            u_k = tl.load(us_ptr + (tok[:, None] * (iters + 1) + k) * SP + s, mask=smask, other=0.0)
            u_prev = tl.load(us_ptr + (tok[:, None] * (iters + 1) + k - 1) * SP + s, mask=smask, other=0.0)
            v_k = tl.load(vs_ptr + (tok[:, None] * iters + k - 1) * SP + s, mask=smask, other=0.0)
            gb = -gu_s * u_k * u_k  # d (K v_k)
            gK += gb[:, :, None] * v_k[:, None, :]
            gv = gv_direct + tl.sum(K * gb[:, :, None], axis=1)
            gv_direct = tl.zeros((BT, SP), tl.float32)
            ga = -gv * v_k * v_k  # d (K^T u_(k-1))
            gK += u_prev[:, :, None] * ga[:, None, :]
            gu_s = tl.sum(K * ga[:, None, :], axis=2)
        gl_res = gK * K * open_  # the column max is a constant; floored entries get none
    # logits = rstd z + b: d z = rstd d l; d rstd = d l . z gives dX_j = -rstd^3 / (S D) (d rstd) X_j
    rstd = tl.load(rstd_ptr + tok, mask=tok_ok, other=1.0)
    z_pre = tl.load(z_ptr + tok[:, None] * C + s, mask=s_ok, other=0.0)
    z_post = tl.load(z_ptr + tok[:, None] * C + S + s, mask=s_ok, other=0.0)
    z_res = tl.load(z_ptr + tok[:, None, None] * C + 2 * S + i3 * S + j3, mask=rmask, other=0.0)
    grad_rstd = tl.sum(gl_pre * z_pre, axis=1) + tl.sum(gl_post * z_post, axis=1)
    grad_rstd += tl.sum(tl.sum(gl_res * z_res, axis=2), axis=1)
    coef = -grad_rstd * rstd * rstd * rstd / (S * D)  # (BT,)
    tl.store(gl_ptr + tok[:, None] * C + s, gl_pre, mask=s_ok)
    tl.store(gl_ptr + tok[:, None] * C + S + s, gl_post, mask=s_ok)
    tl.store(gl_ptr + tok[:, None, None] * C + 2 * S + i3 * S + j3, gl_res, mask=rmask)
    tl.store(gz_ptr + tok[:, None] * C + s, gl_pre * rstd[:, None], mask=s_ok)
    tl.store(gz_ptr + tok[:, None] * C + S + s, gl_post * rstd[:, None], mask=s_ok)
    tl.store(gz_ptr + tok[:, None, None] * C + 2 * S + i3 * S + j3, gl_res * rstd[:, None, None], mask=rmask)
    for j in tl.static_range(S):
        gxj = coef[:, None] * tl.load(X_ptr + tok[:, None] * xt + j * xs + d, mask=xmask, other=0.0)
        if HAS_GU:
            pj = tl.load(maps_ptr + tok * C + S + j, mask=tok_ok, other=0.0)
            gxj += pj[:, None] * gu
        tl.store(gX_ptr + tok[:, None] * (S * D) + j * D + d, gxj, mask=xmask)


@triton.jit
def _write_forward_kernel(
    X_ptr, xt, xs, maps_ptr, out_ptr, keep_ptr, gamma_ptr, beta_ptr, new_ptr, N, D, eps,
    S: tl.constexpr, SP: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr, HAS_KEEP: tl.constexpr,
    POST_LN: tl.constexpr,
):  # fmt: skip
    """X' = (H_res X + H_post^T out) keep, or LN(...) keep per stream (Post-LN); X' (N, S, D) contiguous."""
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    tok_ok = tok < N
    y = _write_streams(X_ptr, xt, xs, maps_ptr, out_ptr, tok, tok_ok, D, S, SP, DP, BT)  # (BT, SP, DP)
    i3 = tl.arange(0, SP)[None, :, None]
    d3 = tl.arange(0, DP)[None, None, :]
    mask = tok_ok[:, None, None] & (i3 < S) & (d3 < D)
    if POST_LN:
        yhat, _ = _standardise(y, mask, D, eps)
        gamma = tl.load(gamma_ptr + d3, mask=d3 < D, other=0.0)
        beta = tl.load(beta_ptr + d3, mask=d3 < D, other=0.0)
        y = yhat * gamma + beta
    if HAS_KEEP:
        y = y * tl.load(keep_ptr + tok, mask=tok_ok, other=0.0)[:, None, None]
    tl.store(new_ptr + tok[:, None, None] * (S * D) + i3 * D + d3, y, mask=mask)


@triton.jit
def _write_streams(X_ptr, xt, xs, maps_ptr, out_ptr, tok, tok_ok, D, S: tl.constexpr, SP: tl.constexpr,
                   DP: tl.constexpr, BT: tl.constexpr):  # fmt: skip
    """y_i = sum_j H_res,ij X_j + H_post,i out, (BT, SP, DP), zero outside the S streams and D entries."""
    C: tl.constexpr = 2 * S + S * S
    s = tl.arange(0, SP)[None, :]
    s_ok = (s < S) & tok_ok[:, None]
    d = tl.arange(0, DP)[None, :]
    xmask = tok_ok[:, None] & (d < D)
    post = tl.load(maps_ptr + tok[:, None] * C + s, mask=s_ok, other=0.0)  # (BT, SP)
    out = tl.load(out_ptr + tok[:, None] * D + d, mask=xmask, other=0.0)  # (BT, DP)
    y = post[:, :, None] * out[:, None, :]
    for j in tl.static_range(S):
        xj = tl.load(X_ptr + tok[:, None] * xt + j * xs + d, mask=xmask, other=0.0)
        res_j = tl.load(maps_ptr + tok[:, None] * C + 2 * S + s * S + j, mask=s_ok, other=0.0)  # column j of H_res
        y += res_j[:, :, None] * xj[:, None, :]
    return y


@triton.jit
def _standardise(y, mask, D, eps):
    """(y - mean) rstd over the last axis (its first D entries; zero elsewhere), and rstd (BT, SP)."""
    mean = tl.sum(y, axis=2) / D
    centred = tl.where(mask, y - mean[:, :, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=2) / D + eps)
    return centred * rstd[:, :, None], rstd


@triton.jit
def _write_backward_kernel(
    X_ptr, xt, xs, maps_ptr, out_ptr, keep_ptr, gamma_ptr, grad_ptr, gt, gs, gout_ptr, gmaps_ptr, gX_ptr,
    ggamma_ptr, gbeta_ptr, N, D, eps,
    S: tl.constexpr, SP: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr, HAS_KEEP: tl.constexpr,
    POST_LN: tl.constexpr,
):  # fmt: skip
    """With g the gradient at the write's pre-norm sum (keep dX', or taken back through Post-LN's LayerNorm):
    d out = sum_i H_post,i g_i, d H_post,i = g_i . out, d H_res,ij = g_i . X_j, dX_j = sum_i H_res,ij g_i; Post-LN
    also writes each token's d gamma, d beta (summed over streams) for the caller to sum over tokens."""
    C: tl.constexpr = 2 * S + S * S
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    tok_ok = tok < N
    s = tl.arange(0, SP)[None, :]
    s_ok = (s < S) & tok_ok[:, None]
    d = tl.arange(0, DP)[None, :]
    xmask = tok_ok[:, None] & (d < D)
    i3 = tl.arange(0, SP)[None, :, None]
    d3 = tl.arange(0, DP)[None, None, :]
    mask = tok_ok[:, None, None] & (i3 < S) & (d3 < D)
    g = tl.load(grad_ptr + tok[:, None, None] * gt + i3 * gs + d3, mask=mask, other=0.0)  # (BT, SP, DP)
    if HAS_KEEP:
        g = g * tl.load(keep_ptr + tok, mask=tok_ok, other=0.0)[:, None, None]
    if POST_LN:
        y = _write_streams(X_ptr, xt, xs, maps_ptr, out_ptr, tok, tok_ok, D, S, SP, DP, BT)
        yhat, rstd = _standardise(y, mask, D, eps)
        tl.store(ggamma_ptr + tok[:, None] * D + d, tl.sum(g * yhat, axis=1), mask=xmask)
        tl.store(gbeta_ptr + tok[:, None] * D + d, tl.sum(g, axis=1), mask=xmask)
        gh = g * tl.load(gamma_ptr + d3, mask=d3 < D, other=0.0)
        mean_gh = tl.sum(gh, axis=2) / D
        mean_ghy = tl.sum(gh * yhat, axis=2) / D
        g = tl.where(mask, rstd[:, :, None] * (gh - mean_gh[:, :, None] - yhat * mean_ghy[:, :, None]), 0.0)
    post = tl.load(maps_ptr + tok[:, None] * C + s, mask=s_ok, other=0.0)
    out = tl.load(out_ptr + tok[:, None] * D + d, mask=xmask, other=0.0)
    tl.store(gout_ptr + tok[:, None] * D + d, tl.sum(post[:, :, None] * g, axis=1), mask=xmask)
    tl.store(gmaps_ptr + tok[:, None] * C + s, tl.sum(g * out[:, None, :], axis=2), mask=s_ok)
    tl.store(gmaps_ptr + tok[:, None] * C + S + s, tl.zeros((BT, SP), tl.float32), mask=s_ok)
    for j in tl.static_range(S):
        xj = tl.load(X_ptr + tok[:, None] * xt + j * xs + d, mask=xmask, other=0.0)
        tl.store(gmaps_ptr + tok[:, None] * C + 2 * S + s * S + j, tl.sum(g * xj[:, None, :], axis=2), mask=s_ok)
        res_j = tl.load(maps_ptr + tok[:, None] * C + 2 * S + s * S + j, mask=s_ok, other=0.0)
        tl.store(gX_ptr + tok[:, None] * (S * D) + j * D + d, tl.sum(res_j[:, :, None] * g, axis=1), mask=xmask)


class _Read(torch.autograd.Function):
    """X (N, S, D), fused weight W (S*D, C), bias (C) -> u (N, D), maps (N, C), max |X| per token (N,)."""

    @staticmethod
    def forward(ctx, X: Tensor, weight: Tensor, bias: Tensor, iters: int):
        N, S, D = X.shape
        C = 2 * S + S * S
        BT, SP, DP = _tiles(S, D)
        z = X.reshape(N, S * D) @ weight  # (N, C); copies X first only where it is a stride-0 expansion
        rstd, maxabs = X.new_empty(N), X.new_empty(N)
        u, maps = X.new_empty(N, D), X.new_empty(N, C)
        save = any(ctx.needs_input_grad)
        us = X.new_empty(N, iters + 1, SP) if save else X.new_empty(1)
        vs = X.new_empty(N, iters, SP) if save else X.new_empty(1)
        _read_forward_kernel[_grid(N, BT)](
            X, X.stride(0), X.stride(1), z, bias, rstd, u, maps, maxabs, us, vs, N, D, iters, RMS_EPS,
            SINKHORN_FLOOR, S=S, SP=SP, DP=DP, BT=BT, SAVE=save,
        )  # fmt: skip
        ctx.save_for_backward(X, weight, bias, z, rstd, maps, us, vs)
        ctx.iters = iters
        ctx.mark_non_differentiable(maxabs)
        ctx.set_materialize_grads(False)
        return u, maps, maxabs

    @staticmethod
    def backward(ctx, grad_u, grad_maps, _grad_maxabs):
        X, weight, bias, z, rstd, maps, us, vs = ctx.saved_tensors
        N, S, D = X.shape
        BT, SP, DP = _tiles(S, D)
        grad_u = None if grad_u is None else grad_u.contiguous()
        grad_maps = None if grad_maps is None else grad_maps.contiguous()
        grad_logit, grad_z = torch.empty_like(z), torch.empty_like(z)
        grad_X = X.new_empty(N, S, D)
        _read_backward_kernel[_grid(N, BT)](
            X, X.stride(0), X.stride(1), z, bias, rstd, maps, us, vs,
            grad_u if grad_u is not None else z, grad_maps if grad_maps is not None else z,
            grad_logit, grad_z, grad_X, N, D, ctx.iters, SINKHORN_FLOOR,
            S=S, SP=SP, DP=DP, BT=BT, HAS_GU=grad_u is not None, HAS_GMAPS=grad_maps is not None,
        )  # fmt: skip
        grad_X.view(N, S * D).addmm_(grad_z, weight.t())  # + d z W^T
        grad_weight = X.reshape(N, S * D).t() @ grad_z if ctx.needs_input_grad[1] else None
        return grad_X, grad_weight, grad_logit.sum(dim=0), None


class _Write(torch.autograd.Function):
    """X (N, S, D), maps (N, C), out (N, D), keep (N,) | None, LayerNorm weight, bias | None -> X' (N, S, D)."""

    @staticmethod
    def forward(ctx, X, maps, out, keep, norm_weight, norm_bias, eps):
        N, S, D = X.shape
        BT, SP, DP = _tiles(S, D)
        out = out.contiguous()
        post_ln = norm_weight is not None
        new = X.new_empty(N, S, D)
        _write_forward_kernel[_grid(N, BT)](
            X, X.stride(0), X.stride(1), maps, out, keep if keep is not None else out,
            norm_weight if post_ln else out, norm_bias if post_ln else out, new, N, D, eps,
            S=S, SP=SP, DP=DP, BT=BT, HAS_KEEP=keep is not None, POST_LN=post_ln,
        )  # fmt: skip
        ctx.save_for_backward(X, maps, out, keep, norm_weight)
        ctx.eps = eps
        return new

    @staticmethod
    def backward(ctx, grad):
        X, maps, out, keep, norm_weight = ctx.saved_tensors
        N, S, D = X.shape
        BT, SP, DP = _tiles(S, D)
        if grad.stride(-1) != 1:
            grad = grad.contiguous()  # a stride-0 stream dim (from the sum readout) is read as it is
        post_ln = norm_weight is not None
        grad_out, grad_maps, grad_X = torch.empty_like(out), torch.empty_like(maps), X.new_empty(N, S, D)
        grad_gamma = X.new_empty(N, D) if post_ln else out
        grad_beta = X.new_empty(N, D) if post_ln else out
        _write_backward_kernel[_grid(N, BT)](
            X, X.stride(0), X.stride(1), maps, out, keep if keep is not None else out,
            norm_weight if post_ln else out, grad, grad.stride(0), grad.stride(1), grad_out, grad_maps, grad_X,
            grad_gamma, grad_beta, N, D, ctx.eps,
            S=S, SP=SP, DP=DP, BT=BT, HAS_KEEP=keep is not None, POST_LN=post_ln,
        )  # fmt: skip
        norm_grads = (grad_gamma.sum(dim=0), grad_beta.sum(dim=0)) if post_ln else (None, None)
        return grad_X, grad_maps, grad_out, None, *norm_grads, None


MHC = Kernel(run=forward, supports=supports)
