// mHC connection kernels for the CPU (seqrec.kernels.mhc_cpu): the read before a sublayer and the write-back after
// it, forward and backward, one pass over each token's S x D stream state at a time.
//
// Why hand-written: the reference (seqrec.nn.residual.MHCConnection) and even a torch.compile fused form pass
// over the (N, S, D) state ~15-20 times per connection and step; at hidden 50 those passes, not the arithmetic, are what
// mHC costs. Here each kernel visits a token's state once, and the per-token S x S work (sigmoids, Sinkhorn and its
// reverse) runs on blocks of TB tokens laid out [entry][token], so that the compiler vectorises it across tokens.
// Sums over D (dot products, LayerNorm statistics) keep 16 lanes of vector accumulators per sum and add them once,
// by a fixed tree (hsum): an `omp simd` reduction ends by adding the lanes one after another, and that chain, once
// per dot product (S^2 + S of them per token in the write's backward), was most of the write's backward. Vectors
// are as wide as the machine's registers (VL below); the 16-lane sums make the results the same at every width.
//
// Layouts (float32): X (N, S, D) stream state, unit stride over D, any token and stream strides (xt, xs: the
// first connection reads the embedding with xs = 0); W (S*D, CP) fused mapping weight (phi with the RMSNorm gain
// and the gates folded in), columns zero-padded to a multiple of 16 (PAD), WT its transpose (C, SDp), padded likewise;
// b (C) static logits; C = 2S + S*S with logit columns
// [pre | post | res (row-major S x S)]. maps (N, C) per token in the order [post | pre | res] (post already 2 sigma),
// so that maps[:, S:] is [H_pre; H_res] as one (1 + S, S) block. keep (N) is 1 for real tokens, 0 for padding.
// Every function handles tokens [n0, n1), so callers can split N across threads.
//
// The maths is seqrec.nn.residual.MHCConnection's (mHC, arXiv 2512.24880, Eq. 7-9): logits = rstd * (x W) + b with
// rstd = (|x|^2 / (S D) + eps)^-1/2; H_pre = sigma, H_post = 2 sigma; H_res = Sinkhorn(logits_res) with
// K = exp(max(l - column max, -FLOOR)), then `iters` rounds of v = 1 / K^T u, u = 1 / K v, H_res = diag(u) K diag(v).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int TB = 64;            // tokens per block, G vectors of VL lanes per entry: G independent Sinkhorn
                                  // chains interleaved, so that each hides the others' division latency
constexpr int MAX_ITERS = 64;     // mhc_cpu.MAX_ITERS
// Floats per vector: the machine's register width. GCC lowers a vector type wider than the registers through
// memory, element by element (on an AVX2 machine 16-float vectors made the read forward ~9x slower), so the width
// follows the target; SEQREC_MHC_LANES overrides it (the tests build 4-, 8- and 16-lane libraries on one machine and
// check, with FMA contraction off, that they compute bit for bit what the native one does).
#if defined(SEQREC_MHC_LANES)
#define MHC_VL SEQREC_MHC_LANES
#elif defined(__AVX512F__)
#define MHC_VL 16
#elif defined(__AVX__)
#define MHC_VL 8
#else
#define MHC_VL 4
#endif
constexpr int VL = MHC_VL;
constexpr int SUM_LANES = 16;     // sums over D run on 16 lanes whatever VL is (hsum), so their rounding is the same
constexpr int P = SUM_LANES / VL;  // vectors per 16 lanes
constexpr int PAD = 16;           // mhc_cpu.LANES: W, W^T and d W come with columns padded to a multiple of it
constexpr int REGS = VL == 16 ? 32 : 16;  // vector registers (AVX-512 has 32, AVX and SSE 16)
constexpr int G = TB / VL;
static_assert(VL == 4 || VL == 8 || VL == 16, "SEQREC_MHC_LANES must be 4, 8 or 16");

typedef float vf __attribute__((vector_size(VL * sizeof(float))));
inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));
inline vf splat(float x) { return vf{} + x; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }
// For the loops written with explicit vectors: the auto-vectoriser would otherwise re-roll their independent
// accumulators into one dependency chain.
#if defined(__GNUC__) && !defined(__clang__)
#define NO_AUTOVEC __attribute__((optimize("no-tree-vectorize")))
#else
#define NO_AUTOVEC
#endif
constexpr float FLOOR = 20.0f;    // seqrec.nn.residual.SINKHORN_FLOOR
constexpr float RMS_EPS = 1e-6f;  // seqrec.nn.residual.RMS_EPS

// exp for x in [-87, 88] (clamped), Cephes' polynomial, ~1 ulp: plain vector arithmetic, where libm's expf would
// be a scalar call per lane.
inline vf exp_approx(vf x) {
  x = vmin(vmax(x, splat(-87.0f)), splat(88.0f));
  const vf t = x * 1.44269504088896341f + 0.5f;
  vi n = __builtin_convertvector(t, vi);  // truncates toward zero; floor below
  n += (__builtin_convertvector(n, vf) > t);  // comparisons give -1 where true
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vi bits = (n + 127) << 23;  // 2^n
  return (p * r * r + r + 1.0f) * (vf)bits;  // a cast between equal-sized vectors keeps the bits
}

inline vf sigmoid(vf x) { return 1.0f / (1.0f + exp_approx(-x)); }

// 16 lanes (P vectors, lanes 0-15 in order) summed as a fixed tree: lane i + lane i + 8, then i + i + 4, then
// (0 + 2) + (1 + 3), so that the rounding does not depend on the machine's vector width. One tree per dot product
// replaces a loop's per-lane reduction (16 dependent scalar adds).
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
inline float hsum(const vf (&v)[P]) {
#if MHC_VL == 4
  const vf4 q = (v[0] + v[2]) + (v[1] + v[3]);
#else
#if MHC_VL == 16
  const vf8 h = __builtin_shufflevector(v[0], v[0], 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v[0], v[0], 8, 9, 10, 11, 12, 13, 14, 15);
#else
  const vf8 h = v[0] + v[1];
#endif
  const vf4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
#endif
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// One T from p: a vector, or a float (for the loops below, written once for both).
template <class T>
inline T ld(const float* p);
template <>
inline vf ld<vf>(const float* p) { return load(p); }
template <>
inline float ld<float>(const float* p) { return *p; }
inline void st(float* p, vf v) { store(p, v); }
inline void st(float* p, float v) { *p = v; }

// out[r] = sum_d f(d)_r over [0, D) for R sums at once: f(d, acc) adds its R terms at d into acc, R sets of P
// vectors (16 lanes) for each whole 16-chunk (their lanes summed once at the end, by hsum), then R floats (out
// itself) for each of the last D % 16 entries.
template <int R, class F>
inline void sums_over(int D, F&& f, float (&out)[R]) {
  vf acc[P][R];  // acc[p][r]: lanes p * VL .. p * VL + VL - 1 of sum r
  for (int p = 0; p < P; ++p)
    for (int r = 0; r < R; ++r) acc[p][r] = splat(0.0f);
  int d = 0;
  for (; d + SUM_LANES <= D; d += SUM_LANES)
    for (int p = 0; p < P; ++p) f(d + p * VL, acc[p]);
  for (int r = 0; r < R; ++r) {
    vf lanes[P];
    for (int p = 0; p < P; ++p) lanes[p] = acc[p][r];
    out[r] = hsum(lanes);
  }
  for (; d < D; ++d) f(d, out);
}

// sum_d f(d) over [0, D): f(d, vf{}) for each whole vector of the 16-chunks, f(d, 0.0f) for each of the last D % 16
// entries; f returns the type of its second argument.
template <class F>
inline float sum_over(int D, F&& f) {
  float sum[1];
  sums_over<1>(D, [&](int d, auto& acc) { acc[0] += f(d, acc[0]); }, sum);
  return sum[0];
}

// out[r] = g . rows[r] over D entries, for R rows at once: 16 lanes (P vectors) per row over the whole 16-chunks
// of D (g loaded once for all rows), each summed by hsum, then the last D % 16 entries added one at a time.
template <int R>
inline void dot_rows(const float* g, const float* const (&rows)[R], int D, float (&out)[R]) {
  vf acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = splat(0.0f);
  int d = 0;
  for (; d + SUM_LANES <= D; d += SUM_LANES)
    for (int p = 0; p < P; ++p) {
      const vf gv = load(g + d + p * VL);
      for (int r = 0; r < R; ++r) acc[r][p] += gv * load(rows[r] + d + p * VL);
    }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
  for (; d < D; ++d)
    for (int r = 0; r < R; ++r) out[r] += g[d] * rows[r][d];
}

template <int S>
struct Kernels {
  static constexpr int C = 2 * S + S * S;  // logits [pre | post | res]
  static constexpr int SS = S * S;
  static constexpr int CP = (C + PAD - 1) / PAD * PAD, NV = CP / VL;  // W's padded columns, in NV vectors

  // Per-block scratch: each entry is G vectors, lane t % VL of vector t / VL for the block's token t; lanes past
  // the block's token count hold zero logits.
  struct Block {
    vf logit[C][G];
    vf K[SS][G];
    vf open[SS][G];  // 1 where the Sinkhorn kernel entry is not floored (its logit gets gradient), else 0
    vf us[MAX_ITERS + 1][S][G];  // u_0 .. u_T
    vf vs[MAX_ITERS][S][G];      // v_1 .. v_T
  };

  // K = exp(max(l - column max, -FLOOR)) and the scalings u, v of every iteration.
  static void sinkhorn_forward(Block& blk, int iters) {
    const auto* l = blk.logit + 2 * S;
    for (int j = 0; j < S; ++j)
      for (int g = 0; g < G; ++g) {
        vf colmax = l[j][g];
        for (int i = 1; i < S; ++i) colmax = vmax(colmax, l[i * S + j][g]);
        for (int i = 0; i < S; ++i) {
          const vf shifted = l[i * S + j][g] - colmax;
          blk.open[i * S + j][g] = shifted < -FLOOR ? splat(0.0f) : splat(1.0f);
          blk.K[i * S + j][g] = exp_approx(vmax(shifted, splat(-FLOOR)));
        }
      }
    for (int i = 0; i < S; ++i)
      for (int g = 0; g < G; ++g) blk.us[0][i][g] = splat(1.0f);
    for (int k = 0; k < iters; ++k) {
      for (int j = 0; j < S; ++j)  // v = 1 / K^T u
        for (int g = 0; g < G; ++g) {
          vf acc = blk.K[j][g] * blk.us[k][0][g];
          for (int i = 1; i < S; ++i) acc += blk.K[i * S + j][g] * blk.us[k][i][g];
          blk.vs[k][j][g] = 1.0f / acc;
        }
      for (int i = 0; i < S; ++i)  // u = 1 / K v
        for (int g = 0; g < G; ++g) {
          vf acc = blk.K[i * S][g] * blk.vs[k][0][g];
          for (int j = 1; j < S; ++j) acc += blk.K[i * S + j][g] * blk.vs[k][j][g];
          blk.us[k + 1][i][g] = 1.0f / acc;
        }
    }
  }

  // Reverse mode of sinkhorn_forward: grad = d loss / d H_res per entry, replaced by d loss / d logits_res.
  static void sinkhorn_backward(const Block& blk, int iters, vf (*grad)[G]) {
    vf gK[SS][G], gu[S][G], gv[S][G];
    const auto* u = blk.us[iters];
    const auto* v = blk.vs[iters - 1];
    for (int i = 0; i < S; ++i)
      for (int g = 0; g < G; ++g) gu[i][g] = gv[i][g] = splat(0.0f);
    for (int i = 0; i < S; ++i)  // M_ij = u_i K_ij v_j
      for (int j = 0; j < S; ++j)
        for (int g = 0; g < G; ++g) {
          const vf gM = grad[i * S + j][g], gMK = gM * blk.K[i * S + j][g];
          gu[i][g] += gMK * v[j][g];
          gv[j][g] += gMK * u[i][g];
          gK[i * S + j][g] = gM * u[i][g] * v[j][g];
        }
    for (int k = iters; k >= 1; --k) {
      vf gb[S][G], ga[S][G];  // u_k = 1 / b, b = K v_k; v_k = 1 / a, a = K^T u_(k-1)
      for (int i = 0; i < S; ++i)
        for (int g = 0; g < G; ++g) gb[i][g] = -gu[i][g] * blk.us[k][i][g] * blk.us[k][i][g];
      for (int j = 0; j < S; ++j)
        for (int g = 0; g < G; ++g) {
          vf acc = (k == iters) ? gv[j][g] : splat(0.0f);  // v_N also reaches M directly
          for (int i = 0; i < S; ++i) {
            gK[i * S + j][g] += gb[i][g] * blk.vs[k - 1][j][g];
            acc += blk.K[i * S + j][g] * gb[i][g];
          }
          ga[j][g] = -acc * blk.vs[k - 1][j][g] * blk.vs[k - 1][j][g];
        }
      for (int i = 0; i < S; ++i)
        for (int g = 0; g < G; ++g) {
          vf acc = splat(0.0f);
          for (int j = 0; j < S; ++j) {
            gK[i * S + j][g] += blk.us[k - 1][i][g] * ga[j][g];
            acc += blk.K[i * S + j][g] * ga[j][g];
          }
          gu[i][g] = acc;
        }
    }
    // K = exp(logits - column max) and M does not depend on the shift: d logits = K * dK (0 where floored)
    for (int e = 0; e < SS; ++e)
      for (int g = 0; g < G; ++g) grad[e][g] = gK[e][g] * blk.K[e][g] * blk.open[e][g];
  }

  // Rows of tokens [n, n + nb) of an (N, S, D) tensor with token stride ts and stream stride ss (unit stride over D)
  // as nb contiguous rows of S*D floats: the tensor itself when it is contiguous, else a copy in buf (TB*S*D). A
  // stride-0 stream dim is what the first connection reads (the embedding, not yet copied into S streams) and the
  // last one's gradient is (the readout sums the streams).
  static const float* block_rows(const float* A, int64_t ts, int64_t ss, int64_t n, int nb, int D, float* buf) {
    if (ts == static_cast<int64_t>(S) * D && ss == D) return A + n * ts;
    for (int t = 0; t < nb; ++t)
      for (int j = 0; j < S; ++j)
        std::memcpy(buf + (static_cast<int64_t>(t) * S + j) * D, A + (n + t) * ts + j * ss, D * sizeof(float));
    return buf;
  }

  // one token's entry e of a block array, t in [0, TB)
  static float& at(vf (*a)[G], int e, int t) { return a[e][t / VL][t % VL]; }
  static float at(const vf (*a)[G], int e, int t) { return a[e][t / VL][t % VL]; }

  // z = x W for one token, with W zero-padded to CP columns: vector registers accumulate over the S*D entries of x
  // (4 independent sets, so that the FMAs do not wait on each other), and |x|^2.
  NO_AUTOVEC static void mapping_matmul_one(const float* x, const float* W, int SD, float* z, float* sumsq) {
    vf acc[4][NV] = {};
    int k = 0;
    for (; k + 4 <= SD; k += 4)
      for (int a = 0; a < 4; ++a)
        for (int v = 0; v < NV; ++v) acc[a][v] += x[k + a] * load(W + static_cast<int64_t>(k + a) * CP + v * VL);
    for (; k < SD; ++k)
      for (int v = 0; v < NV; ++v) acc[0][v] += x[k] * load(W + static_cast<int64_t>(k) * CP + v * VL);
    float out[CP];
    for (int v = 0; v < NV; ++v) store(out + v * VL, (acc[0][v] + acc[1][v]) + (acc[2][v] + acc[3][v]));
    std::memcpy(z, out, C * sizeof(float));
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int q = 0; q < SD; ++q) ss += x[q] * x[q];
    *sumsq = ss;
  }

  // Tokens per pass over W in read_forward: TR x NV accumulators and a row of W (NV vectors) in registers. With 32
  // registers 8 tokens (16 accumulators at S = 4) keep both FMA pipes busy; with 16, as many as fit.
  static constexpr int FIT = REGS / NV - 1;  // tokens whose accumulators fit beside a row of W
  static constexpr int ROWS = VL == 16 ? 8 : FIT >= 4 ? 4 : FIT >= 2 ? 2 : 1;

  // The same for TR consecutive token rows at once: each row of W is loaded once for all of them.
  template <int TR>
  NO_AUTOVEC static void mapping_matmul_rows(const float* x, const float* W, int SD, float (*z)[C], float* sumsq) {
    vf acc[TR][NV] = {};
    for (int k = 0; k < SD; ++k)
      for (int v = 0; v < NV; ++v) {
        const vf w = load(W + static_cast<int64_t>(k) * CP + v * VL);
        for (int t = 0; t < TR; ++t) acc[t][v] += x[t * SD + k] * w;
      }
    for (int t = 0; t < TR; ++t) {
      float out[CP];
      for (int v = 0; v < NV; ++v) store(out + v * VL, acc[t][v]);
      std::memcpy(z[t], out, C * sizeof(float));
      const float* row = x + t * SD;
      float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
      for (int q = 0; q < SD; ++q) ss += row[q] * row[q];
      sumsq[t] = ss;
    }
  }

  // d W += sum_t x_t^T d z_t over TR consecutive token rows (gz rows zero-padded to CP), into gW (S*D, CP).
  template <int TR>
  NO_AUTOVEC static void accumulate_grad_weight(const float* x, int SD, const float (*gz)[CP], float* gW) {
    vf g[TR][NV];
    for (int t = 0; t < TR; ++t)
      for (int v = 0; v < NV; ++v) g[t][v] = load(gz[t] + v * VL);
    for (int k = 0; k < SD; ++k)
      for (int v = 0; v < NV; ++v) {
        float* row = gW + static_cast<int64_t>(k) * CP + v * VL;
        vf a = load(row);
        for (int t = 0; t < TR; ++t) a += x[t * SD + k] * g[t][v];
        store(row, a);
      }
  }

  // gx_t[k] += coef_t x_t[k] + sum_c gz_t[c] WT[c][k] for NA * VL consecutive entries k of TR tokens (rows
  // SD apart): a register tile of TR x NA vectors, each row of W^T loaded once for all TR tokens.
  template <int TR, int NA>
  NO_AUTOVEC static void mapping_matmul_backward_tile(const float* x, int64_t SD, const float* WT, int SDp,
                                                      const float (*gz)[CP], const float* coef, float* gx) {
    vf acc[TR][NA];
    for (int t = 0; t < TR; ++t)
      for (int a = 0; a < NA; ++a) acc[t][a] = load(gx + t * SD + a * VL) + coef[t] * load(x + t * SD + a * VL);
    for (int c = 0; c < C; ++c) {
      const float* w = WT + static_cast<int64_t>(c) * SDp;
      for (int a = 0; a < NA; ++a) {
        const vf wa = load(w + a * VL);
        for (int t = 0; t < TR; ++t) acc[t][a] += gz[t][c] * wa;
      }
    }
    for (int t = 0; t < TR; ++t)
      for (int a = 0; a < NA; ++a) store(gx + t * SD + a * VL, acc[t][a]);
  }

  // The same over all S*D entries of TR tokens: tiles of BT vectors, then one of the (fewer) vectors left, through
  // zero-padded copies of x and gx when the last vector is partial. WT is (C, SDp), SDp = S*D rounded up to PAD.
  static constexpr int BT = REGS / 8;  // vectors per tile: TR x BT accumulators stay in registers for TR = 4
  template <int TR>
  static void mapping_matmul_backward(const float* x, int SD, const float* WT, int SDp, const float (*gz)[CP],
                                      const float* coef, float* gx) {
    int k = 0;
    for (; k + BT * VL <= SD; k += BT * VL)
      mapping_matmul_backward_tile<TR, BT>(x + k, SD, WT + k, SDp, gz, coef, gx + k);
    const int rest = SD - k;
    if (rest == 0) return;
    float x_pad[TR][BT * VL] = {}, gx_pad[TR][BT * VL] = {};
    for (int t = 0; t < TR; ++t) {
      std::memcpy(x_pad[t], x + t * SD + k, rest * sizeof(float));
      std::memcpy(gx_pad[t], gx + t * SD + k, rest * sizeof(float));
    }
    switch ((rest + VL - 1) / VL) {
      case 1: mapping_matmul_backward_tile<TR, 1>(x_pad[0], BT * VL, WT + k, SDp, gz, coef, gx_pad[0]); break;
      case 2: mapping_matmul_backward_tile<TR, 2>(x_pad[0], BT * VL, WT + k, SDp, gz, coef, gx_pad[0]); break;
      case 3: mapping_matmul_backward_tile<TR, 3>(x_pad[0], BT * VL, WT + k, SDp, gz, coef, gx_pad[0]); break;
      case 4: mapping_matmul_backward_tile<TR, 4>(x_pad[0], BT * VL, WT + k, SDp, gz, coef, gx_pad[0]); break;
      default: break;
    }
    for (int t = 0; t < TR; ++t) std::memcpy(gx + t * SD + k, gx_pad[t], rest * sizeof(float));
  }

  // gx_j = H_pre,j g_u + sum_i H_res,ij keep g_i for the S streams j of one token (g_u or g may be null: no term),
  // written over gx, which may be g itself: each VL-chunk of all streams is read before any of it is written.
  static void state_grad_through_maps(const float* m, float keep, const float* gu, const float* g, int D, float* gx) {
    float pre[S], res[S][S];  // res[j][i] = H_res,ij keep
    for (int j = 0; j < S; ++j) {
      pre[j] = gu ? m[S + j] : 0.0f;
      for (int i = 0; i < S; ++i) res[j][i] = g ? m[2 * S + i * S + j] * keep : 0.0f;
    }
    auto chunk = [&](int d, auto lanes) {
      using T = decltype(lanes);
      T gi[S];
      for (int i = 0; i < S; ++i) gi[i] = g ? ld<T>(g + i * D + d) : T{};
      const T u = gu ? ld<T>(gu + d) : T{};
      for (int j = 0; j < S; ++j) {
        T acc = pre[j] * u;
        for (int i = 0; i < S; ++i) acc += res[j][i] * gi[i];
        st(gx + j * D + d, acc);
      }
    };
    int d = 0;
    for (; d + VL <= D; d += VL) chunk(d, vf{});
    for (; d < D; ++d) chunk(d, 0.0f);
  }

  static void read_forward(int64_t n0, int64_t n1, int D, int iters, const float* X0, int64_t xt, int64_t xs,
                           const float* W, const float* b, float* u_out, float* maps, float* z_out, float* rstd_out,
                           float* ms_out) {
    const int SD = S * D;
    Block blk;
    std::vector<float> xbuf(static_cast<size_t>(TB) * SD);
    for (int64_t n = n0; n < n1; n += TB) {
      const int nb = static_cast<int>(std::min<int64_t>(n1 - n, TB));
      const float* X = block_rows(X0, xt, xs, n, nb, D, xbuf.data()) - n * SD;  // token n + t at X + (n + t) * SD
      float z[TB][C], ss[TB];
      int t = 0;
      if constexpr (ROWS == 8)
        for (; t + 8 <= nb; t += 8) mapping_matmul_rows<8>(X + (n + t) * SD, W, SD, z + t, ss + t);
      for (; t + 4 <= nb; t += 4)
        for (int r = 0; r < 4; r += std::min(ROWS, 4))
          mapping_matmul_rows<std::min(ROWS, 4)>(X + (n + t + r) * SD, W, SD, z + t + r, ss + t + r);
      // the last nb % 4 tokens, whatever ROWS is: each token's sums are the same on every machine
      for (; t < nb; ++t) mapping_matmul_one(X + (n + t) * SD, W, SD, z[t], ss + t);
      for (t = 0; t < TB; ++t) {
        if (t >= nb) {
          for (int c = 0; c < C; ++c) at(blk.logit, c, t) = 0.0f;
          continue;
        }
        const float ms = ss[t] / SD, rstd = 1.0f / std::sqrt(ms + RMS_EPS);
        for (int c = 0; c < C; ++c) at(blk.logit, c, t) = z[t][c] * rstd + b[c];
        if (z_out) std::memcpy(z_out + (n + t) * C, z[t], sizeof z[t]);
        if (rstd_out) rstd_out[n + t] = rstd;
        if (ms_out) ms_out[n + t] = ms;
      }
      sinkhorn_forward(blk, iters);
      vf gate[2 * S][G];
      for (int c = 0; c < 2 * S; ++c)
        for (int g = 0; g < G; ++g) gate[c][g] = sigmoid(blk.logit[c][g]);
      for (int t = 0; t < nb; ++t) {
        float m[C];
        for (int i = 0; i < S; ++i) m[i] = 2.0f * at(gate, S + i, t);  // post
        for (int j = 0; j < S; ++j) m[S + j] = at(gate, j, t);         // pre
        for (int i = 0; i < S; ++i)
          for (int j = 0; j < S; ++j)
            m[2 * S + i * S + j] = at(blk.us[iters], i, t) * at(blk.K, i * S + j, t) * at(blk.vs[iters - 1], j, t);
        std::memcpy(maps + (n + t) * C, m, sizeof m);
        const float* x = X + (n + t) * SD;
        float* u = u_out + (n + t) * D;
#pragma omp simd
        for (int d = 0; d < D; ++d) {
          float acc = 0.0f;
          for (int j = 0; j < S; ++j) acc += m[S + j] * x[j * D + d];
          u[d] = acc;
        }
      }
    }
  }

  // y_i = sum_j H_res,ij x_j + H_post,i out for every stream i of one token, into y (S*D).
  static void write_streams(const float* m, const float* x, int64_t xs, const float* o, int D, float scale, float* y) {
    float post[S], res[SS];
    for (int i = 0; i < S; ++i) post[i] = m[i] * scale;
    for (int e = 0; e < SS; ++e) res[e] = m[2 * S + e] * scale;
    for (int i = 0; i < S; ++i) {
      float* yi = y + i * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) {
        float acc = post[i] * o[d];
        for (int j = 0; j < S; ++j) acc += res[i * S + j] * x[j * xs + d];
        yi[d] = acc;
      }
    }
  }

  // y_i = sum_j H_res,ij x_j + H_post,i out for one stream i of one token, into yi (D); returns sum_d y_i,d (the
  // LayerNorm's first pass, taken while y_i is in registers).
  static float write_stream_sum(const float* m, const float* x, int64_t xs, const float* o, int D, int i, float* yi) {
    float res[S];
    for (int j = 0; j < S; ++j) res[j] = m[2 * S + i * S + j];
    const float post = m[i];
    return sum_over(D, [&](int d, auto lanes) {
      using T = decltype(lanes);
      T acc = post * ld<T>(o + d);
      for (int j = 0; j < S; ++j) acc += res[j] * ld<T>(x + j * xs + d);
      st(yi + d, acc);
      return acc;
    });
  }

  // yhat_i = (y_i - mean) rstd, y_i = sum_j H_res,ij x_j + H_post,i out, for one stream i of one token, into yi.
  static void write_stream(const float* m, const float* x, int64_t xs, const float* o, int D, int i, float mean,
                           float rstd, float* yi) {
    float res[S];
    for (int j = 0; j < S; ++j) res[j] = m[2 * S + i * S + j];
    const float post = m[i];
#pragma omp simd
    for (int d = 0; d < D; ++d) {
      float acc = post * o[d];
      for (int j = 0; j < S; ++j) acc += res[j] * x[j * xs + d];
      yi[d] = (acc - mean) * rstd;
    }
  }

  // Pre-LN (gamma null): X' = (H_res X + H_post^T out) keep. Post-LN: X' = (LN(H_res X + H_post^T out)) keep, the
  // LayerNorm (gamma, beta, eps) per stream over D, three passes over each stream (the write with the sum, the
  // variance, the normalisation); each stream's mean and 1/std go to stats (N, S, 2) for the backward (may be null).
  static void write_forward(int64_t n0, int64_t n1, int D, const float* X0, int64_t xt, int64_t xs,
                            const float* maps, const float* out, const float* keep, const float* gamma,
                            const float* beta, float eps, float* X_new, float* stats) {
    for (int64_t n = n0; n < n1; ++n) {
      const float k = keep ? keep[n] : 1.0f;
      float* y = X_new + n * S * D;
      const float* m = maps + n * C;
      const float* x = X0 + n * xt;
      const float* o = out + n * D;
      if (!gamma) {
        write_streams(m, x, xs, o, D, k, y);
        continue;
      }
      for (int i = 0; i < S; ++i) {
        float* yi = y + i * D;
        const float mean = write_stream_sum(m, x, xs, o, D, i, yi) / D;
        const float var = sum_over(D, [&](int d, auto lanes) {
          const auto centred = ld<decltype(lanes)>(yi + d) - mean;
          return centred * centred;
        });
        const float rstd = 1.0f / std::sqrt(var / D + eps);
#pragma omp simd
        for (int d = 0; d < D; ++d) {
          const float yhat = (yi[d] - mean) * rstd;
          yi[d] = (yhat * gamma[d] + beta[d]) * k;
        }
        if (stats) {
          stats[(n * S + i) * 2] = mean;
          stats[(n * S + i) * 2 + 1] = rstd;
        }
      }
    }
  }

  // Backward of the write for the sublayer output and the mappings (the state's part is the read backward's job):
  // with g = keep dX' (Pre-LN), d out = sum_i H_post,i g_i, d H_post,i = g_i . out, d H_res,ij = g_i . X_j.
  // Post-LN (gamma not null): g is first taken back through the LayerNorm (its input recomputed from X and out,
  // normalised with the forward's saved mean and 1/std, stats), its gamma and beta gradients are added to g_ln
  // (2 D, one buffer per concurrent caller), and that g is written to g_pre (N, S, D) for the read backward.
  static void write_backward(int64_t n0, int64_t n1, int D, const float* X0, int64_t xt, int64_t xs,
                             const float* maps, const float* out, const float* keep, const float* grad, int64_t gt,
                             int64_t gs, const float* gamma, const float* stats, float* g_out, float* g_maps,
                             float* g_pre, float* g_ln) {
    std::vector<float> yb(gamma ? static_cast<size_t>(S) * D : 0);
    for (int64_t n = n0; n < n1; ++n) {
      const float* m = maps + n * C;
      const float* x = X0 + n * xt;  // stream j at x + j * xs
      const float* o = out + n * D;
      const float k = keep ? keep[n] : 1.0f;
      const float* g = grad + n * gt;  // stream i at g + i * gs
      int64_t g_stream = gs;
      float scale = k;  // d X' -> d (pre-norm write) factor
      if (gamma) {
        float* y = yb.data();
        float* gp_rows = g_pre + n * S * D;
        for (int i = 0; i < S; ++i) {
          float* yi = y + i * D;
          const float mean = stats[(n * S + i) * 2], rstd = stats[(n * S + i) * 2 + 1];
          write_stream(m, x, xs, o, D, i, mean, rstd, yi);  // yi is the normalised yhat
          const float* gi = g + i * gs;
          float* gpi = gp_rows + i * D;
          float sums[2];  // gh = keep dX' gamma, into gpi; sums of gh and gh yhat
          sums_over<2>(D, [&](int d, auto& acc) {
            using T = std::remove_reference_t<decltype(acc[0])>;
            const T gk = ld<T>(gi + d) * k, yh = ld<T>(yi + d);
            st(g_ln + d, ld<T>(g_ln + d) + gk * yh);  // d gamma
            st(g_ln + D + d, ld<T>(g_ln + D + d) + gk);  // d beta
            const T gh = gk * ld<T>(gamma + d);
            st(gpi + d, gh);
            acc[0] += gh;
            acc[1] += gh * yh;
          }, sums);
          const float a = sums[0] / D, c = sums[1] / D;
#pragma omp simd
          for (int d = 0; d < D; ++d) gpi[d] = rstd * (gpi[d] - a - yi[d] * c);
        }
        g = gp_rows;
        g_stream = D;
        scale = 1.0f;
      }
      float* go = g_out + n * D;
      float* gm = g_maps + n * C;
      float post[S];
      for (int i = 0; i < S; ++i) post[i] = m[i] * scale;
#pragma omp simd
      for (int d = 0; d < D; ++d) {
        float acc = 0.0f;
        for (int i = 0; i < S; ++i) acc += post[i] * g[i * g_stream + d];
        go[d] = acc;
      }
      const float* rows[S + 1];  // out, then the streams of X
      rows[0] = o;
      for (int j = 0; j < S; ++j) rows[1 + j] = x + j * xs;
      for (int i = 0; i < S; ++i) {
        float dots[S + 1];  // g_i . out, g_i . X_j
        dot_rows<S + 1>(g + i * g_stream, rows, D, dots);
        gm[i] = dots[0] * scale;
        gm[S + i] = 0.0f;
        for (int j = 0; j < S; ++j) gm[2 * S + i * S + j] = dots[1 + j] * scale;
      }
    }
  }

  // WT is (C, SDp), SDp = S*D rounded up to PAD with zero columns. Per block of TB tokens: Sinkhorn and its reverse,
  // then per token the logits' gradients (d z into gzb), then d X = H_pre^T d u + H_res^T keep dX' for every token
  // (written over dX' when gX is its buffer), then d X += d z W^T - rstd^3 / (S D) (d rstd) x four tokens at a time,
  // then d W += x^T d z.
  static void read_backward(int64_t n0, int64_t n1, int D, int iters, const float* X0, int64_t xt, int64_t xs,
                            const float* WT, int SDp, const float* b, const float* z, const float* rstd,
                            const float* maps, const float* g_u, const float* g_maps, const float* grad0, int64_t gt,
                            int64_t gs, const float* keep, float* gX, float* g_logits, float* gW) {
    const int SD = S * D;
    Block blk;
    vf gres[SS][G];
    float gzb[TB][CP] = {};  // the block's d z, zero-padded columns, for d X and d W
    float coef[TB];          // the block's -rstd^3 / (S D) d rstd, the RMS term of d X
    std::vector<float> xbuf(static_cast<size_t>(TB) * SD), gbuf(static_cast<size_t>(TB) * SD);
    for (int64_t n = n0; n < n1; n += TB) {
      const int nb = static_cast<int>(std::min<int64_t>(n1 - n, TB));
      const float* X = block_rows(X0, xt, xs, n, nb, D, xbuf.data()) - n * SD;  // token n + t at X + (n + t) * SD
      const float* grad = grad0 ? block_rows(grad0, gt, gs, n, nb, D, gbuf.data()) - n * SD : nullptr;
      for (int t = 0; t < TB; ++t) {
        const bool real = t < nb;
        for (int c = 0; c < C; ++c) at(blk.logit, c, t) = real ? z[(n + t) * C + c] * rstd[n + t] + b[c] : 0.0f;
        for (int e = 0; e < SS; ++e) at(gres, e, t) = (real && g_maps) ? g_maps[(n + t) * C + 2 * S + e] : 0.0f;
      }
      sinkhorn_forward(blk, iters);
      sinkhorn_backward(blk, iters, gres);
      for (int t = 0; t < nb; ++t) {
        const int64_t tok = n + t;
        const float* x = X + tok * SD;
        const float* gu = g_u ? g_u + tok * D : nullptr;
        const float* m = maps + tok * C;
        float gl[C];
        float gpre[S] = {};  // d u . x_j
        if (gu) {
          const float* rows[S];
          for (int j = 0; j < S; ++j) rows[j] = x + j * D;
          dot_rows<S>(gu, rows, D, gpre);
        }
        for (int j = 0; j < S; ++j)  // pre = sigma(l_j): d l = (d u . x_j) sigma (1 - sigma)
          gl[j] = gpre[j] * m[S + j] * (1.0f - m[S + j]);
        for (int i = 0; i < S; ++i)  // post p = 2 sigma(l): d l = d p * 2 sigma (1 - sigma) = d p * p (1 - p / 2)
          gl[S + i] = g_maps ? g_maps[tok * C + i] * m[i] * (1.0f - 0.5f * m[i]) : 0.0f;
        for (int e = 0; e < SS; ++e) gl[2 * S + e] = at(gres, e, t);
        // logits = rstd z + b: d z = rstd d l, d rstd = d l . z, and d x += d z W^T - rstd^3 / (S D) (d rstd) x
        const float r = rstd[tok];
        float grstd = 0.0f;
        float* gz = gzb[t];
        for (int c = 0; c < C; ++c) {
          grstd += gl[c] * z[tok * C + c];
          gz[c] = gl[c] * r;
        }
        std::memcpy(g_logits + tok * C, gl, sizeof gl);
        coef[t] = -grstd * r * r * r / SD;
      }
      for (int t = 0; t < nb; ++t) {  // through the read and the write: H_pre,j d u + sum_i H_res,ij keep d X'_i
        const int64_t tok = n + t;
        state_grad_through_maps(maps + tok * C, keep ? keep[tok] : 1.0f, g_u ? g_u + tok * D : nullptr,
                                grad ? grad + tok * SD : nullptr, D, gX + tok * SD);
      }
      int t = 0;  // through the mappings: d X += d z W^T + coef x, and d W += x^T d z, 4 tokens per pass
      for (; t + 4 <= nb; t += 4) {
        mapping_matmul_backward<4>(X + (n + t) * SD, SD, WT, SDp, gzb + t, coef + t, gX + (n + t) * SD);
        accumulate_grad_weight<4>(X + (n + t) * SD, SD, gzb + t, gW);
      }
      for (; t < nb; ++t) {
        mapping_matmul_backward<1>(X + (n + t) * SD, SD, WT, SDp, gzb + t, coef + t, gX + (n + t) * SD);
        accumulate_grad_weight<1>(X + (n + t) * SD, SD, gzb + t, gW);
      }
    }
  }
};

}  // namespace

#define MHC_DISPATCH(S_RUNTIME, CALL)                  \
  switch (S_RUNTIME) {                                  \
    case 1: Kernels<1>::CALL; break;                    \
    case 2: Kernels<2>::CALL; break;                    \
    case 3: Kernels<3>::CALL; break;                    \
    case 4: Kernels<4>::CALL; break;                    \
    case 5: Kernels<5>::CALL; break;                    \
    case 6: Kernels<6>::CALL; break;                    \
    case 7: Kernels<7>::CALL; break;                    \
    case 8: Kernels<8>::CALL; break;                    \
    default: break;                                     \
  }

extern "C" {

// u = H_pre X (N, D); maps (N, C); z = x W (N, C), rstd (N) and the mean square (N) (each may be null).
void mhc_read_forward(int64_t n0, int64_t n1, int S, int D, int iters, const float* X, int64_t xt, int64_t xs,
                      const float* W, const float* b, float* u, float* maps, float* z, float* rstd, float* ms) {
  MHC_DISPATCH(S, read_forward(n0, n1, D, iters, X, xt, xs, W, b, u, maps, z, rstd, ms))
}

// X' = (H_res X + H_post^T out) * keep, (N, S, D), or with the per-stream LayerNorm (gamma, beta, eps) before the
// keep; keep may be null (all ones), gamma and beta null (Pre-LN).
void mhc_write_forward(int64_t n0, int64_t n1, int S, int D, const float* X, int64_t xt, int64_t xs,
                       const float* maps, const float* out, const float* keep, const float* gamma, const float* beta,
                       float eps, float* X_new, float* stats) {
  MHC_DISPATCH(S, write_forward(n0, n1, D, X, xt, xs, maps, out, keep, gamma, beta, eps, X_new, stats))
}

// The write's backward for the sublayer output and the mappings (the state's part is left to the read's
// backward): with g = keep dX', d out = sum_i H_post,i g_i, d H_post,i = g_i . out, d H_res,ij = g_i . X_j;
// g_maps in the maps order [post | pre | res], pre entries zero. With gamma (Post-LN), g is first taken back
// through the LayerNorm and written to g_pre, and d gamma, d beta are added to g_ln (2 D, one per caller).
void mhc_write_backward(int64_t n0, int64_t n1, int S, int D, const float* X, int64_t xt, int64_t xs,
                        const float* maps, const float* out, const float* keep, const float* grad, int64_t gt,
                        int64_t gs, const float* gamma, const float* stats, float* g_out, float* g_maps,
                        float* g_pre, float* g_ln) {
  MHC_DISPATCH(S, write_backward(n0, n1, D, X, xt, xs, maps, out, keep, grad, gt, gs, gamma, stats, g_out, g_maps,
                                 g_pre, g_ln))
}

// The read's backward plus the state's gradient through the write, H_res^T keep dX' (grad may be null).
// g_maps: the write's [post | . | res] gradients (may be null); g_u: d loss / d u (may be null). Outputs dX
// (N, S, D) and d logits (N, C) in the logit order [pre | post | res] (the caller sums it for d b), and adds
// d W = x^T (rstd d logits) for its tokens into gW (S*D, CP) (one buffer per concurrent caller).
void mhc_read_backward(int64_t n0, int64_t n1, int S, int D, int iters, const float* X, int64_t xt, int64_t xs,
                       const float* WT, int SDp, const float* b, const float* z, const float* rstd,
                       const float* maps, const float* g_u, const float* g_maps, const float* grad, int64_t gt,
                       int64_t gs, const float* keep, float* gX, float* g_logits, float* gW) {
  MHC_DISPATCH(S, read_backward(n0, n1, D, iters, X, xt, xs, WT, SDp, b, z, rstd, maps, g_u, g_maps, grad, gt, gs,
                                keep, gX, g_logits, gW))
}

}  // extern "C"
