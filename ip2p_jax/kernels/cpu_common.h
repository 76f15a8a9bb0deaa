// Shared by the CPU kernels: float vectors (GCC vector extensions; with -march=native
// 16 floats where the CPU has AVX-512, else 8: AVX2+FMA on x86, NEON pairs on Arm),
// aligned scratch, one register-blocked matrix product and a parallel loop over XLA's
// intra-op thread pool. Operands come in multiples of 8 floats (W); the products and
// the elementwise loops run on the widest vector (VW floats), an 8-float half vector
// taking a row's last 8 where VW is 16.
#ifndef IP2P_JAX_KERNELS_CPU_COMMON_H_
#define IP2P_JAX_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ip2p {

namespace ffi = xla::ffi;

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

constexpr int W = 8;  // the operands' granularity: channels and head_dim are multiples of it
#if defined(__AVX512F__)
constexpr int VW = 16;  // floats in the widest vector
using vf = v16;
#else
constexpr int VW = 8;
using vf = v8;
#endif

template <typename V>
constexpr int lanes = sizeof(V) / sizeof(float);
template <typename V>  // the vector's int32 twin (for exponent bits)
using ints_t = std::conditional_t<lanes<V> == 16, i16, i8>;

// Unaligned loads and stores (memcpy: one vmovups).
template <typename V = v8>
inline V load(const float* p) {
  V x;
  __builtin_memcpy(&x, p, sizeof(V));
  return x;
}
template <typename V>
inline void store(float* p, V x) { __builtin_memcpy(p, &x, sizeof(V)); }
template <typename V = v8>
inline V splat(float x) {  // one vbroadcastss (V{} + x would add a zero first)
  if constexpr (lanes<V> == 16)
    return V{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
  else
    return V{x, x, x, x, x, x, x, x};
}
inline long round_up(long x, long m) { return (x + m - 1) / m * m; }

// 2^x for x <= 126 (attention keeps its scores in base 2: the query scaled by log2(e) saves
// the exponential a multiplication and a two-part range reduction): x = n + r with n
// rounded to nearest by the 1.5 * 2^23 trick, 2^r = e^(r ln 2) by its Taylor polynomial
// of degree 6 (relative error < 2e-7 for |r| <= 1/2), 2^n written into the exponent
// bits. Inputs below -126 give 2^-126 ~ 1.2e-38, not 0; inputs up to 126 are exact to
// the same error (above, the exponent overflows: callers keep x <= 126).
template <typename V>
inline V vexp2(V x) {
  using I = ints_t<V>;
  const V lo = splat<V>(-126.0f), magic = splat<V>(12582912.0f);
  x = x < lo ? lo : x;
  const V big = x + magic;
  const V r = x - (big - magic);
  const I n = (I)big - (I)magic;
  V y = splat<V>(1.5403530393381606e-4f);
  y = y * r + 1.3333558146428443e-3f;
  y = y * r + 9.6181291076284772e-3f;
  y = y * r + 5.5504108664821580e-2f;
  y = y * r + 2.4022650695910071e-1f;
  y = y * r + 6.9314718055994531e-1f;
  y = y * r + 1.0f;
  return y * (V)((n + 127) << 23);
}

// Float scratch aligned to cache lines (unaligned vector loads that split lines cost
// the value products a third of their speed), zeroed unless asked not to. Running out of
// memory ends the process
// with a message (no exception may cross XLA's C API or leave a pool thread).
struct Scratch {
  explicit Scratch(long n, bool zeroed = true)
      : data_(static_cast<float*>(std::aligned_alloc(64, round_up(n * 4, 64) + 64))) {
    if (data_ == nullptr) {
      std::fprintf(stderr, "ip2p_jax CPU kernels: out of memory for %ld floats\n", n);
      std::abort();
    }
    if (zeroed) std::fill(data_, data_ + n, 0.0f);
  }
  ~Scratch() { std::free(data_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* data() { return data_; }
  float& operator[](long i) { return data_[i]; }

 private:
  float* data_;
};

template <typename V>
inline float hsum(V x) {
  float s = 0;
  for (int i = 0; i < lanes<V>; ++i) s += x[i];
  return s;
}

template <typename V>
inline float hmax(V x) {
  float m = x[0];
  for (int i = 1; i < lanes<V>; ++i) m = std::max(m, x[i]);
  return m;
}

// Shifted copies of A summed in one product, as a convolution's taps are: the product
// is the sum over t < count of (A + a_offset[t]) (B + t * b_stride). One tap: a plain
// product.
struct Taps {
  int count = 1;
  const long* a_offset = nullptr;  // nullptr: 0
  long b_stride = 0;
};

// Where a register tile's R rows of A are, tap by tap: ``tap<R>(t)`` gives A_t(r, k).
// Strided: row r at a + a_offset[t] + r ars, its floats acs apart (a plain or transposed
// matrix, shifted per tap).
struct StridedRows {
  const float* a;
  long ars, acs;
  const long* a_offset;  // nullptr: 0
  struct Tap {
    const float* a;
    long ars, acs;
    float operator()(int r, long k) const { return a[r * ars + k * acs]; }
  };
  template <int R>
  Tap tap(int t) const { return {a + (a_offset ? a_offset[t] : 0), ars, acs}; }
};
// Indirect: row r of tap t at its own pointer rows[t R + r], contiguous (a convolution's
// output pixels, whose neighbourhoods are not evenly spaced at the end of an image row).
struct IndirectRows {
  const float* const* rows;
  template <int R>
  struct Tap {
    const float* a[R];
    float operator()(int r, long k) const { return a[r][k]; }
  };
  template <int R>
  Tap<R> tap(int t) const {
    Tap<R> x;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) x.a[r] = rows[t * R + r];
    return x;
  }
};

// C[R x NV lanes] (+)= sum over taps t < taps of A_t B_t over k < K, in vectors of type
// V; A_t's rows as ``rows`` says, B_t = B + t b_stride row-major (ldb). The accumulators
// stay in registers across all taps.
template <typename V, int R, int NV, typename Rows>
void micro(long K, const Rows& rows, int taps, const float* B, long ldb, long b_stride, float* C,
           long ldc, bool accumulate) {
  constexpr int L = lanes<V>;
  V acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      acc[r][v] = accumulate ? load<V>(C + r * ldc + v * L) : splat<V>(0);
  for (int t = 0; t < taps; ++t) {
    const auto a = rows.template tap<R>(t);
    const float* bt = B + t * b_stride;
    for (long k = 0; k < K; ++k) {
      const float* b = bt + k * ldb;
      V bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) bv[v] = load<V>(b + v * L);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        V x = splat<V>(a(r, k));
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] += x * bv[v];
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * L, acc[r][v]);
}

template <typename Rows>
using Micro = void (*)(long, const Rows&, int, const float*, long, long, float*, long, bool);

// A register tile of C: rows by vectors of VW floats, as many accumulators as the
// registers allow with the B vectors and a broadcast beside them. AVX2 (16 registers):
// 6 x 2 ran every product here fastest on a 2-core AMD EPYC: 135-140 GFLOP/s in a 3x3
// convolution against 95-105 for 3 x 4, 4 x 3 and 2 x 5 (benchmarks/conv_benchmark.py),
// 77 against 66 in attention's P V at d = 40. AVX-512 (32 registers), one core of a
// Xeon, C (+)= A B with A 2016 x 576 (BENCHMARKS.md): 6 x 4 (64 columns) 146 GFLOP/s
// against 121 for 12 x 2, 115 for 8 x 3, 134 for 4 x 4; 32 columns: 12 x 2 124
// against 98 for 6 x 4; 16 columns: 14 x 1 97.
struct Tile {
  int rows, vectors;
  static constexpr Tile for_width(long n) {  // n: floats in C's row, a multiple of W
#if defined(__AVX512F__)
    return n >= 4 * VW ? Tile{6, 4} : n >= 2 * VW ? Tile{12, 2} : Tile{14, 1};
#else
    return n == W ? Tile{8, 1} : Tile{6, 2};
#endif
  }
};
constexpr int kMaxR = 14, kMaxNV = 4;  // the tiles Tile::for_width picks, and their remainders
constexpr int kMaxTaps = 9;            // taps a product sums at once (a 3x3 convolution's)

template <typename V, typename Rows, int R, int... NV>
constexpr std::array<Micro<Rows>, kMaxNV> row_of(std::integer_sequence<int, NV...>) {
  return {micro<V, R, NV + 1, Rows>...};
}
template <typename V, typename Rows, int... R>
constexpr std::array<std::array<Micro<Rows>, kMaxNV>, kMaxR> table(
    std::integer_sequence<int, R...>) {
  return {row_of<V, Rows, R + 1>(std::make_integer_sequence<int, kMaxNV>())...};
}
template <typename Rows, int... R>
constexpr std::array<Micro<Rows>, kMaxR> half_table(std::integer_sequence<int, R...>) {
  return {micro<v8, R + 1, 1, Rows>...};
}
// kMicro<Rows>[rows - 1][vectors - 1] on VW-float vectors; kHalf<Rows>[rows - 1]: one
// 8-float vector.
template <typename Rows>
constexpr auto kMicro = table<vf, Rows>(std::make_integer_sequence<int, kMaxR>());
template <typename Rows>
constexpr auto kHalf = half_table<Rows>(std::make_integer_sequence<int, kMaxR>());

// The blocking shared by gemm and gemm_rows: C[M x N] (+)= sum over taps t of A_t B_t,
// N a multiple of W, B_t = B + t taps.b_stride. B's columns come in panels of the
// tile's width: panel p starts at B + p * panel (panel = 0: B is one row-major matrix
// whose rows are ldb apart). Every row tile of C sweeps the same slice of B, so K, and
// a convolution's taps, are cut into slices of up to 16 KiB of B, which stay in a core's
// L1 cache (a 256 x 40 slice streamed from L2 held the attention's value product to L2's
// bandwidth; 9 taps of 128 channels held a convolution to 60% of its speed).
// ``rows_at(i, r, g0, count, k0)``: the A rows (StridedRows or IndirectRows) of C's rows
// [i, i + r), taps [g0, g0 + count), from float k0 on.
template <typename RowsAt>
void blocked_product(Tile t, long M, long N, long K, const float* B, long ldb, long panel,
                     float* C, long ldc, bool accumulate, const Taps& taps,
                     const RowsAt& rows_at) {
  constexpr long kBudget = 16 << 10;
  if (taps.count <= 0) return;
  const long width = t.vectors * VW;
  const long slice = std::max<long>(W, kBudget / (4 * width));
  const long group = std::clamp<long>(kBudget / (4 * width * std::min(K, slice)), 1,
                                      std::min(taps.count, kMaxTaps));
  for (long j = 0; j < N; j += width) {
    const long cols = std::min(width, N - j);
    const int nv = static_cast<int>(cols / VW);
    const bool half = cols % VW != 0;  // 8 floats left (VW = 16 only)
    const float* b = panel ? B + j / width * panel : B + j;
    for (long g0 = 0; g0 < taps.count; g0 += group) {
      const int count = static_cast<int>(std::min<long>(group, taps.count - g0));
      const float* bg = b + g0 * taps.b_stride;
      const bool acc = accumulate || g0 > 0;
      for (long k0 = 0; k0 < K; k0 += slice) {
        const long kn = std::min(slice, K - k0);
        for (long i = 0; i < M; i += t.rows) {
          const int r = static_cast<int>(std::min<long>(t.rows, M - i));
          const auto rows = rows_at(i, r, g0, count, k0);
          using Rows = std::decay_t<decltype(rows)>;
          float* c = C + i * ldc + j;
          if (nv > 0)
            kMicro<Rows>[r - 1][nv - 1](kn, rows, count, bg + k0 * ldb, ldb, taps.b_stride, c,
                                        ldc, acc || k0 > 0);
          if (half)
            kHalf<Rows>[r - 1](kn, rows, count, bg + k0 * ldb + nv * VW, ldb, taps.b_stride,
                               c + nv * VW, ldc, acc || k0 > 0);
        }
      }
    }
  }
}

// C[M x N] (+)= A[M x K] B[K x N] (summed over taps: A shifted by taps.a_offset[t], B by
// t taps.b_stride); A(r, k) = A[r ars + k acs]; N a multiple of W; B in panels as
// blocked_product says.
inline void gemm(Tile t, long M, long N, long K, const float* A, long ars, long acs,
                 const float* B, long ldb, long panel, float* C, long ldc, bool accumulate,
                 const Taps& taps = Taps{}) {
  blocked_product(t, M, N, K, B, ldb, panel, C, ldc, accumulate, taps,
                  [&](long i, int, long g0, int, long k0) {
                    return StridedRows{A + i * ars + k0 * acs, ars, acs,
                                       taps.a_offset ? taps.a_offset + g0 : nullptr};
                  });
}

// gemm's indirect twin for convolutions: C[M x N] (+)= sum over taps t of A_t B_t, where
// row m of A_t starts at A + row_offset[m] + taps.a_offset[t] (K floats, contiguous;
// a_offset nullptr: 0) and B_t = B + t taps.b_stride (row-major, ldb).
inline void gemm_rows(Tile t, long M, long N, long K, const float* A, const long* row_offset,
                      const float* B, long ldb, float* C, long ldc, bool accumulate,
                      const Taps& taps) {
  const float* ptr[kMaxTaps * kMaxR];
  blocked_product(t, M, N, K, B, ldb, 0, C, ldc, accumulate, taps,
                  [&](long i, int r, long g0, int count, long k0) {
                    for (int tap = 0; tap < count; ++tap)
                      for (int q = 0; q < r; ++q)
                        ptr[tap * r + q] = A + row_offset[i + q] + k0 +
                                           (taps.a_offset ? taps.a_offset[g0 + tap] : 0);
                    return IndirectRows{ptr};
                  });
}

// body(i) for i < n on the caller and XLA's intra-op pool. Helpers that start after
// the last task was claimed return at once, so none waits on another.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, long n, const F& body) {
  long helpers = std::min<long>(pool.num_threads(), n) - 1;
  if (helpers <= 0) {
    for (long i = 0; i < n; ++i) body(i);
    return;
  }
  struct State {
    std::atomic<long> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &body]() {
    for (long i; (i = state->next.fetch_add(1)) < n;) {
      body(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (long t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

}  // namespace ip2p

#endif  // IP2P_JAX_KERNELS_CPU_COMMON_H_
