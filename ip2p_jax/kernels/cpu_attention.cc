// FlashAttention (Dao et al. 2022, Algorithms 1 and 2) for the CPU, float32, as XLA FFI
// handlers: ``ip2p_flash_forward`` and ``ip2p_flash_backward``.
//
// Layout: query ``[..., Lq, H, d]``, key and value ``[..., Lk, H, d]`` (the leading axes
// are one batch axis here), output like the query, log-sum-exp ``[..., H, Lq]``.
// ``d`` is a multiple of 8. The forward walks each head's queries in blocks of kRows
// against key blocks of kKeys with the online softmax (on 16-float vectors transposed,
// queries on the lanes, against blocks of kKeysT) and keeps only the output and each
// row's log-sum-exp; the backward recomputes every block's probabilities from them, in
// blocks of kRowsB queries and kKeysB keys. Work is split over XLA's intra-op thread
// pool: forward tasks are (head, query chunk), backward tasks are heads (each owns its
// key and value gradients).
//
// Every product is cpu_common.h's ``gemm``, ``C (+)= A B`` with B row-major and A read
// through two strides, so ``Q K^T`` (K packed transposed), ``P V``, ``P^T dO`` (A read
// transposed), ``dO V^T``, ``dS K`` and ``dS^T Q`` share one register-blocked kernel.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace ip2p;

constexpr long kRows = 64;    // queries per block
constexpr long kKeys = 256;   // keys per block
constexpr long kKeysT = 128;  // keys per block, transposed forward: S^T in L1
// Keys per block, backward: its P and dS blocks (64 x 64, 16 KiB each) stay in L1 with
// the operands; at (3, 4096, 8, 40) forward+backward 0.89 s against 0.99 with 256 keys
// on 16-float vectors, 1.35 against 1.47 on 8-float ones.
constexpr long kKeysB = 64;
constexpr long kRowsB = 64;  // queries per block, backward
// The forward runs transposed (forward_rows_transposed) on 16-float vectors: on a
// 2-core Xeon, batch 3 x 1024 queries x 8 heads, 6.2 ms against 8.6 at head_dim 8, 16.4
// against 19.0 at 40, 59.6 against 64.0 at 160; on 8-float vectors it gained nothing at
// head_dim 8-16 and lost 2-10% at 40-160.
constexpr bool kTransposedForward = VW == 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

struct Shape {
  long batch, lq, lk, heads, d;
  // Row i of a head (batch * heads + h) in a query-shaped or key-shaped buffer.
  template <typename T>
  T* q_at(T* x, long head, long i) const {
    return x + ((head / heads * lq + i) * heads + head % heads) * d;
  }
  template <typename T>
  T* k_at(T* x, long head, long j) const {
    return x + ((head / heads * lk + j) * heads + head % heads) * d;
  }
};

// The tile of the two products whose columns are keys (Q K^T, dO V^T): the widest.
constexpr Tile kScoreTile = Tile::for_width(kKeys);
constexpr long kPanel = kScoreTile.vectors * VW;  // its width: keys per packed panel
static_assert(kKeys % kPanel == 0 && kKeysB % kPanel == 0, "a key block is whole panels");

// Keys transposed into panels of kPanel keys, [lkp / kPanel][d][kPanel] (zero-padded;
// lkp = lk rounded up to kPanel), so a score tile reads contiguous memory; and, if kc,
// the keys as rows, [lk][d].
void pack_keys(const Shape& s, const float* k, long head, float* kt, long lkp, float* kc) {
  std::fill(kt, kt + s.d * lkp, 0.0f);
  for (long j = 0; j < s.lk; ++j) {
    const float* row = s.k_at(k, head, j);
    float* panel = kt + j / kPanel * s.d * kPanel + j % kPanel;
    for (long c = 0; c < s.d; ++c) panel[c * kPanel] = row[c];
    if (kc) std::memcpy(kc + j * s.d, row, s.d * sizeof(float));
  }
}

const float* panels_at(const float* kt, long d, long kb) { return kt + kb / kPanel * d * kPanel; }

// The operands agree as the kernels read them: query [..., Lq, H, d], key and value
// [..., Lk, H, d] with the same leading axes, d a multiple of 8, keys for every query.
ffi::Error check(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                 ffi::Buffer<ffi::F32>& v) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const size_t r = qd.size();
  bool agree = r >= 3 && kd.size() == r && vd.size() == r;
  for (size_t i = 0; agree && i < r; ++i) agree = kd[i] == vd[i] && (i + 3 == r || qd[i] == kd[i]);
  if (!agree)
    return ffi::Error::InvalidArgument(
        "query [..., Lq, H, d] and key, value [..., Lk, H, d] must agree in their other axes");
  if (qd[r - 1] % W != 0)
    return ffi::Error::InvalidArgument("head_dim must be a multiple of 8, got " +
                                       std::to_string(qd[r - 1]));
  if (kd[r - 3] == 0 && q.element_count() > 0)
    return ffi::Error::InvalidArgument("attention over no keys");
  return ffi::Error::Success();
}

Shape shape_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k) {
  auto qd = q.dimensions(), kd = k.dimensions();
  long r = qd.size();
  long batch = 1;
  for (long i = 0; i + 3 < r; ++i) batch *= qd[i];
  return Shape{batch, qd[r - 3], kd[r - 3], qd[r - 2], qd[r - 1]};
}

// One block of rows: S = Qs Kt[:, kb : kb + nk], columns up to a whole vector (nkp) at
// -inf.
void scores(const Shape& s, const float* qs, long mb, const float* kt, long kb, long nk,
            float* S, long ld) {
  long nkp = round_up(nk, VW);
  gemm(kScoreTile, mb, nkp, s.d, qs, s.d, 1, panels_at(kt, s.d, kb), kPanel, s.d * kPanel, S,
       ld, false);
  for (long i = 0; i < mb; ++i)
    for (long j = nk; j < nkp; ++j) S[i * ld + j] = kNegInf;
}

// Queries [row0, row1) of one head with queries on the vector lanes (FlashAttention's
// forward transposed): S^T = K Q^T, the running maximum and sum are vectors over
// queries, P^T = 2^(S^T - m) and O^T += V^T P^T. The row-major form's value product
// runs vectors of head_dim floats (half-filled 16-float vectors at d = 8 or 40) and its
// softmax keeps a scalar per row; here every product and the softmax run full vectors
// across a block of kRows queries.
void forward_rows_transposed(const Shape& s, const float* qp, const float* kp, const float* vp,
                             long head, long row0, long row1, float scale2, float* op,
                             float* lp) {
  constexpr long kR = kRows, kK = kKeysT;
  static_assert(kR % VW == 0, "a query block is whole vectors");
  const long d = s.d;
  const Tile tile = Tile::for_width(kR);
  Scratch kc(s.lk * d), vc(s.lk * d), qt(d * kR), ot(d * kR), St(kK * kR);
  for (long j = 0; j < s.lk; ++j) {
    std::memcpy(&kc[j * d], s.k_at(kp, head, j), d * 4);
    std::memcpy(&vc[j * d], s.k_at(vp, head, j), d * 4);
  }
  alignas(64) float m[kR], l[kR], alpha[kR];
  for (long i0 = row0; i0 < row1; i0 += kR) {
    const long mb = std::min(kR, row1 - i0);
    std::fill(qt.data(), qt.data() + d * kR, 0.0f);  // queries past mb stay zero
    for (long i = 0; i < mb; ++i) {
      const float* row = s.q_at(qp, head, i0 + i);
      for (long c = 0; c < d; ++c) qt[c * kR + i] = row[c] * scale2;
    }
    std::fill(ot.data(), ot.data() + d * kR, 0.0f);
    std::fill(m, m + kR, kNegInf);
    std::fill(l, l + kR, 0.0f);
    for (long kb = 0; kb < s.lk; kb += kK) {
      const long nk = std::min(kK, s.lk - kb);
      gemm(tile, nk, kR, d, kc.data() + kb * d, d, 1, qt.data(), kR, 0, St.data(), kR, false);
      for (long q = 0; q < kR; q += VW) {
        vf mx = load<vf>(m + q);
        for (long j = 0; j < nk; ++j) {
          const vf x = load<vf>(&St[j * kR + q]);
          mx = x > mx ? x : mx;
        }
        const vf old = load<vf>(m + q);
        const vf a = vexp2(old - mx);  // m = -inf: 2^-126, times a zero sum and output
        vf sum = splat<vf>(0);
        for (long j = 0; j < nk; ++j) {
          const vf p = vexp2(load<vf>(&St[j * kR + q]) - mx);
          store(&St[j * kR + q], p);
          sum += p;
        }
        store(l + q, load<vf>(l + q) * a + sum);
        store(m + q, mx);
        store(alpha + q, a);
      }
      for (long c = 0; c < d; ++c)
        for (long q = 0; q < kR; q += VW)
          store(&ot[c * kR + q], load<vf>(&ot[c * kR + q]) * load<vf>(alpha + q));
      gemm(tile, d, kR, nk, vc.data() + kb * d, 1, d, St.data(), kR, 0, ot.data(), kR, true);
    }
    for (long i = 0; i < mb; ++i) {
      float* row = s.q_at(op, head, i0 + i);
      const float inv = 1.0f / l[i];
      for (long c = 0; c < d; ++c) row[c] = ot[c * kR + i] * inv;
      lp[head * s.lq + i0 + i] = (m[i] + std::log2(l[i])) * kLn2;
    }
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse, float scale) {
  if (auto e = check(q, k, v); e.failure()) return e;
  if (q.element_count() == 0) return ffi::Error::Success();
  const Shape s = shape_of(q, k);
  const long heads = s.batch * s.heads, lkp = round_up(s.lk, kPanel), d = s.d;
  const Tile tile = Tile::for_width(d);
  const float scale2 = scale * kLog2e;  // scores in base 2
  const long blocks = (s.lq + kRows - 1) / kRows;
  // Enough tasks to keep every thread busy; a task packs its head's keys once.
  const long want = 4 * std::max<long>(pool.num_threads(), 1);
  const long chunks = std::min(blocks, std::max<long>(1, (want + heads - 1) / heads));
  const long per_chunk = (blocks + chunks - 1) / chunks * kRows;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();

  parallel_for(pool, heads * chunks, [&](long task) {
    const long head = task / chunks, row0 = task % chunks * per_chunk;
    const long row1 = std::min(s.lq, row0 + per_chunk);
    if (row0 >= row1) return;
    if (kTransposedForward) {
      forward_rows_transposed(s, qp, kp, vp, head, row0, row1, scale2, op, lp);
      return;
    }
    Scratch kt(d * lkp), vc(s.lk * d), qs(kRows * d), o(kRows * d), S(kRows * kKeys);
    pack_keys(s, kp, head, kt.data(), lkp, nullptr);
    for (long j = 0; j < s.lk; ++j) std::memcpy(&vc[j * d], s.k_at(vp, head, j), d * 4);
    for (long i0 = row0; i0 < row1; i0 += kRows) {
      const long mb = std::min(kRows, row1 - i0);
      for (long i = 0; i < mb; ++i) {
        const float* row = s.q_at(qp, head, i0 + i);
        for (long c = 0; c < d; ++c) qs[i * d + c] = row[c] * scale2;
      }
      std::fill(o.data(), o.data() + kRows * d, 0.0f);
      float m[kRows], l[kRows];
      std::fill(m, m + kRows, kNegInf);
      std::fill(l, l + kRows, 0.0f);
      for (long kb = 0; kb < s.lk; kb += kKeys) {
        const long nk = std::min(kKeys, s.lk - kb), nkp = round_up(nk, VW);
        scores(s, qs.data(), mb, kt.data(), kb, nk, S.data(), kKeys);
        for (long i = 0; i < mb; ++i) {
          float* row = &S[i * kKeys];
          vf mx = splat<vf>(kNegInf);
          for (long j = 0; j < nkp; j += VW) {
            vf x = load<vf>(row + j);
            mx = x > mx ? x : mx;
          }
          const float m_new = std::max(m[i], hmax(mx));
          const float alpha = m[i] == kNegInf ? 0.0f : std::exp2(m[i] - m_new);
          vf sum = splat<vf>(0), shift = splat<vf>(m_new);
          for (long j = 0; j < nkp; j += VW) {
            vf p = vexp2(load<vf>(row + j) - shift);
            store(row + j, p);
            sum += p;
          }
          l[i] = l[i] * alpha + hsum(sum);
          m[i] = m_new;
          for (long c = 0; c < d; c += W) store(&o[i * d + c], load(&o[i * d + c]) * alpha);
        }
        gemm(tile, mb, d, nk, S.data(), kKeys, 1, vc.data() + kb * d, d, 0, o.data(), d, true);
      }
      for (long i = 0; i < mb; ++i) {
        float* row = s.q_at(op, head, i0 + i);
        const float inv = 1.0f / l[i];
        for (long c = 0; c < d; ++c) row[c] = o[i * d + c] * inv;
        lp[head * s.lq + i0 + i] = (m[i] + std::log2(l[i])) * kLn2;
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_out,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, float scale) {
  if (auto e = check(q, k, v); e.failure()) return e;
  if (q.element_count() == 0 || k.element_count() == 0) {
    std::fill(dk->typed_data(), dk->typed_data() + dk->element_count(), 0.0f);
    std::fill(dv->typed_data(), dv->typed_data() + dv->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  const Shape s = shape_of(q, k);
  const long heads = s.batch * s.heads, lkp = round_up(s.lk, kPanel), d = s.d;
  const Tile tile = Tile::for_width(d);
  const float scale2 = scale * kLog2e;  // scores in base 2
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(),
              *op = out.typed_data(), *lp = lse.typed_data(), *gp = d_out.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();

  parallel_for(pool, heads, [&](long head) {
    Scratch kt(d * lkp), vt(d * lkp), kc(s.lk * d), dkc(s.lk * d), dvc(s.lk * d),
        qs(kRowsB * d), qs2(kRowsB * d), go(kRowsB * d), gq(kRowsB * d), P(kRowsB * kKeysB),
        dS(kRowsB * kKeysB);
    float L[kRowsB], D[kRowsB];
    pack_keys(s, kp, head, kt.data(), lkp, kc.data());
    pack_keys(s, vp, head, vt.data(), lkp, nullptr);
    for (long i0 = 0; i0 < s.lq; i0 += kRowsB) {
      const long mb = std::min(kRowsB, s.lq - i0);
      for (long i = 0; i < mb; ++i) {
        const float *qrow = s.q_at(qp, head, i0 + i), *grow = s.q_at(gp, head, i0 + i),
                    *orow = s.q_at(op, head, i0 + i);
        float delta = 0;
        for (long c = 0; c < d; ++c) {
          qs[i * d + c] = qrow[c] * scale;
          qs2[i * d + c] = qrow[c] * scale2;
          go[i * d + c] = grow[c];
          delta += grow[c] * orow[c];
        }
        D[i] = delta;
        L[i] = lp[head * s.lq + i0 + i] * kLog2e;
      }
      std::fill(gq.data(), gq.data() + kRowsB * d, 0.0f);
      for (long kb = 0; kb < s.lk; kb += kKeysB) {
        const long nk = std::min(kKeysB, s.lk - kb), nkp = round_up(nk, VW);
        scores(s, qs2.data(), mb, kt.data(), kb, nk, P.data(), kKeysB);
        for (long i = 0; i < mb; ++i) {
          vf shift = splat<vf>(L[i]);
          for (long j = 0; j < nkp; j += VW)
            store(&P[i * kKeysB + j], vexp2(load<vf>(&P[i * kKeysB + j]) - shift));
        }
        // dV += P^T dO
        gemm(tile, nk, d, mb, P.data(), 1, kKeysB, go.data(), d, 0, dvc.data() + kb * d, d, true);
        // dP = dO V^T, then dS = P (dP - D)
        gemm(kScoreTile, mb, nkp, d, go.data(), d, 1, panels_at(vt.data(), d, kb), kPanel,
             d * kPanel, dS.data(), kKeysB, false);
        for (long i = 0; i < mb; ++i) {
          vf delta = splat<vf>(D[i]);
          for (long j = 0; j < nkp; j += VW)
            store(&dS[i * kKeysB + j],
                  load<vf>(&P[i * kKeysB + j]) * (load<vf>(&dS[i * kKeysB + j]) - delta));
        }
        // dQ += dS K (scaled below), dK += dS^T Qs
        gemm(tile, mb, d, nk, dS.data(), kKeysB, 1, kc.data() + kb * d, d, 0, gq.data(), d, true);
        gemm(tile, nk, d, mb, dS.data(), 1, kKeysB, qs.data(), d, 0, dkc.data() + kb * d, d, true);
      }
      for (long i = 0; i < mb; ++i) {
        float* row = s.q_at(dqp, head, i0 + i);
        for (long c = 0; c < d; ++c) row[c] = gq[i * d + c] * scale;
      }
    }
    for (long j = 0; j < s.lk; ++j) {
      std::memcpy(s.k_at(dkp, head, j), &dkc[j * d], d * 4);
      std::memcpy(s.k_at(dvp, head, j), &dvc[j * d], d * 4);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Ip2pFlashForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Ip2pFlashBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
