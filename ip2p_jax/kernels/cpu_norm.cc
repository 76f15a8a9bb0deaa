// Group normalisation (Wu & He 2018), optionally followed by SiLU (a resnet block's
// norm-activation pair, fused: the backward recomputes the pre-activation), and, as its
// one-pixel one-group case, layer normalisation (Ba et al. 2016), float32, as XLA FFI
// handlers: ``ip2p_norm_forward`` and ``ip2p_norm_backward``.
//
// Layout: x ``[..., P, C]``, every leading axis one batch axis B; the statistics of
// sample b and group g run over its P pixels and the C / G channels of the group;
// ``scale`` and ``bias`` ``[..., C]`` (leading axes: sets of parameters, the batch split
// evenly over them, as vmap over a model ensemble gives). The forward returns y and
// each (b, g)'s mean and 1 / sqrt(var + eps) ``[..., G]``; the variance is two-pass
// (PyTorch's numerics), its sums in float over blocks of 64 pixels and in double
// across (a layer norm's row in float). XLA:CPU computed these as separate reductions
// and broadcasts, each a pass over the activation; here a sample is three passes forward
// (channel sums, centred squares, output; SiLU applied to the output in a fourth) and
// three backward (the two gradient sums, dx; with SiLU a first pass for the gradient
// before it), the samples split over XLA's intra-op pool.
#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace ip2p;

struct Norm {
  long batch, pixels, channels, groups, sets;
  long per_group() const { return channels / groups; }
  double count() const { return static_cast<double>(pixels) * per_group(); }
};

Norm norm_of(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& scale, long groups) {
  auto d = x.dimensions();
  const long r = d.size();
  long batch = 1;
  for (long i = 0; i + 2 < r; ++i) batch *= d[i];
  const long c = d[r - 1];
  return Norm{batch, d[r - 2], c, groups, c ? static_cast<long>(scale.element_count()) / c : 0};
}

ffi::Error check(const Norm& n, ffi::Buffer<ffi::F32>& scale, ffi::Buffer<ffi::F32>& bias) {
  if (n.groups <= 0 || n.channels % n.groups != 0)
    return ffi::Error::InvalidArgument(std::to_string(n.channels) +
                                       " channels do not split into " +
                                       std::to_string(n.groups) + " groups");
  if (scale.element_count() != bias.element_count() || n.sets == 0 ||
      scale.element_count() != n.sets * n.channels || n.batch % n.sets != 0)
    return ffi::Error::InvalidArgument("scale and bias must be [..., C] and split the batch");
  return ffi::Error::Success();
}

// The samples in chunks, a few per thread (a layer norm has a sample per token: one task
// each would cost more than its work); run() calls body(i, b0, b1) for chunk i.
struct SampleChunks {
  long batch, count, size;
  SampleChunks(ffi::ThreadPool& pool, long batch)
      : batch(batch), count(std::min<long>(batch, 4 * std::max<long>(pool.num_threads(), 1))),
        size(count ? (batch + count - 1) / count : 0) {}
  template <typename F>
  void run(ffi::ThreadPool& pool, const F& body) const {
    parallel_for(pool, count, [&](long i) { body(i, i * size, std::min(batch, (i + 1) * size)); });
  }
};

constexpr float kLog2e = 1.4426950408889634f;

// sigmoid(z) = 1 / (1 + e^-z), e^-z = 2^(-z log2 e) (vexp2, kept below 2^126).
template <typename V>
inline V sigmoid(V z) {
  V t = z * -kLog2e;
  t = t < 126.0f ? t : splat<V>(126.0f);
  return 1.0f / (1.0f + vexp2(t));
}
inline float sigmoid(float z) { return 1.0f / (1.0f + std::exp(-z)); }

// v = silu(v) = v sigmoid(v), in place.
void silu(float* v, long n) {
  long i = 0;
  for (; i + VW <= n; i += VW) {
    const vf z = load<vf>(v + i);
    store(v + i, z * sigmoid(z));
  }
  for (; i < n; ++i) v[i] *= sigmoid(v[i]);
}

// g = dy silu'(z) = dy s (1 + z (1 - s)), s = sigmoid(z); z given in g, overwritten.
void silu_grad(const float* dy, float* g, long n) {
  long i = 0;
  for (; i + VW <= n; i += VW) {
    const vf z = load<vf>(g + i), sg = sigmoid(z);
    store(g + i, load<vf>(dy + i) * sg * (1.0f + z * (1.0f - sg)));
  }
  for (; i < n; ++i) {
    const float z = g[i], sg = sigmoid(z);
    g[i] = dy[i] * sg * (1.0f + z * (1.0f - sg));
  }
}

// out[c] = sum over the sample's pixels of f(p, c), in float across blocks of 64 pixels
// (vectorised) and in double across blocks.
template <typename F>
void channel_sums(const Norm& n, float* block, double* out, const F& f) {
  std::fill(out, out + n.channels, 0.0);
  for (long p0 = 0; p0 < n.pixels; p0 += 64) {
    std::fill(block, block + n.channels, 0.0f);
    for (long p = p0; p < std::min(n.pixels, p0 + 64); ++p)
      for (long c = 0; c < n.channels; ++c) block[c] += f(p, c);
    for (long c = 0; c < n.channels; ++c) out[c] += block[c];
  }
}

// Per channel: the group's mean of a per-channel sum (over the group's channels and the
// sample's pixels).
void group_means(const Norm& n, const double* sums, float* out) {
  const long k = n.per_group();
  for (long g = 0; g < n.groups; ++g) {
    double s = 0;
    for (long c = g * k; c < (g + 1) * k; ++c) s += sums[c];
    std::fill(out + g * k, out + (g + 1) * k, static_cast<float>(s / n.count()));
  }
}

// Layer norm (one pixel, one group): a row of C floats a sample, its sums in float.
void layer_norm_rows(const Norm& n, const float* x, const float* gamma, const float* beta,
                     float eps, long b0, long b1, float* y, float* mean, float* rstd) {
  const long c = n.channels;
  for (long b = b0; b < b1; ++b) {
    const float* row = x + b * c;
    float s = 0, q = 0;
    for (long i = 0; i < c; ++i) s += row[i];
    const float mu = s / c;
    for (long i = 0; i < c; ++i) q += (row[i] - mu) * (row[i] - mu);
    const float r = 1.0f / std::sqrt(q / c + eps);
    float* out = y + b * c;
    for (long i = 0; i < c; ++i) out[i] = (row[i] - mu) * (gamma[i] * r) + beta[i];
    mean[b] = mu;
    rstd[b] = r;
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                   ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd,
                   int64_t groups, float eps, bool with_silu) {
  const Norm n = norm_of(x, scale, groups);
  if (x.element_count() == 0) return ffi::Error::Success();
  if (auto e = check(n, scale, bias); e.failure()) return e;
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *bp = bias.typed_data();
  float *yp = y->typed_data(), *mp = mean->typed_data(), *rp = rstd->typed_data();
  const long per_set = n.batch / n.sets, size = n.pixels * n.channels, k = n.per_group();
  if (n.pixels == 1 && n.groups == 1 && !with_silu) {
    SampleChunks(pool, n.batch).run(pool, [&](long, long b0, long b1) {
      for (long b = b0; b < b1;) {  // runs of samples that share parameters
        const long e = std::min(b1, (b / per_set + 1) * per_set), set = b / per_set;
        layer_norm_rows(n, xp, sp + set * n.channels, bp + set * n.channels, eps, b, e, yp,
                        mp, rp);
        b = e;
      }
    });
    return ffi::Error::Success();
  }
  SampleChunks(pool, n.batch).run(pool, [&](long, long b0, long b1) {
    std::vector<double> sums(n.channels);
    std::vector<float> block(n.channels), mu(n.channels), var(n.channels), a(n.channels);
    for (long b = b0; b < b1; ++b) {
      const float* xb = xp + b * size;
      const float *gamma = sp + b / per_set * n.channels, *beta = bp + b / per_set * n.channels;
      channel_sums(n, block.data(), sums.data(),
                   [&](long p, long c) { return xb[p * n.channels + c]; });
      group_means(n, sums.data(), mu.data());
      channel_sums(n, block.data(), sums.data(), [&](long p, long c) {
        const float d = xb[p * n.channels + c] - mu[c];
        return d * d;
      });
      group_means(n, sums.data(), var.data());
      for (long g = 0; g < n.groups; ++g) {
        const float r = 1.0f / std::sqrt(var[g * k] + eps);
        mp[b * n.groups + g] = mu[g * k];
        rp[b * n.groups + g] = r;
        for (long c = g * k; c < (g + 1) * k; ++c) a[c] = gamma[c] * r;
      }
      float* yb = yp + b * size;
      for (long p = 0; p < n.pixels; ++p) {
        const float* row = xb + p * n.channels;
        float* out = yb + p * n.channels;
        for (long c = 0; c < n.channels; ++c) out[c] = (row[c] - mu[c]) * a[c] + beta[c];
      }
      if (with_silu) silu(yb, size);
    }
  });
  return ffi::Error::Success();
}

// dx = r (dy gamma - mean(dy gamma) - xhat mean(dy gamma xhat)) over each (b, g), and
// dgamma = sum dy xhat, dbeta = sum dy per channel over each parameter set's samples.
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> mean,
                    ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                    ffi::ResultBuffer<ffi::F32> dbias, int64_t groups, bool with_silu) {
  const Norm n = norm_of(x, scale, groups);
  float *dsp = dscale->typed_data(), *dbp = dbias->typed_data();
  std::fill(dsp, dsp + dscale->element_count(), 0.0f);
  std::fill(dbp, dbp + dbias->element_count(), 0.0f);
  if (x.element_count() == 0) return ffi::Error::Success();
  if (auto e = check(n, scale, bias); e.failure()) return e;
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *mp = mean.typed_data(),
              *rp = rstd.typed_data(), *gp = dy.typed_data();
  float* dxp = dx->typed_data();
  const long per_set = n.batch / n.sets, size = n.pixels * n.channels, k = n.per_group();
  if (n.pixels == 1 && n.groups == 1 && !with_silu) {  // a layer norm: a row a sample
    const long c = n.channels;
    const SampleChunks chunks(pool, n.batch);
    // Per chunk, parameter set and channel: sum dy, sum dy xhat (float within a chunk).
    std::vector<float> part1(chunks.count * n.sets * c, 0.0f), part2(part1.size(), 0.0f);
    chunks.run(pool, [&](long i, long b0, long b1) {
      for (long b = b0; b < b1; ++b) {
        const long set = b / per_set;
        float* p1 = part1.data() + (i * n.sets + set) * c;
        float* p2 = part2.data() + (i * n.sets + set) * c;
        const float *row = xp + b * c, *grow = gp + b * c, *gamma = sp + set * c;
        const float mu = mp[b], r = rp[b];
        float a = 0, q = 0;
        for (long j = 0; j < c; ++j) {
          const float xhat = (row[j] - mu) * r, g = grow[j] * gamma[j];
          a += g;
          q += g * xhat;
          p1[j] += grow[j];
          p2[j] += grow[j] * xhat;
        }
        a /= c;
        q /= c;
        float* out = dxp + b * c;
        for (long j = 0; j < c; ++j)
          out[j] = r * (grow[j] * gamma[j] - a - (row[j] - mu) * r * q);
      }
    });
    for (long set = 0; set < n.sets; ++set)
      for (long j = 0; j < c; ++j) {
        double s1 = 0, s2 = 0;
        for (long i = 0; i < chunks.count; ++i) {
          s1 += part1[(i * n.sets + set) * c + j];
          s2 += part2[(i * n.sets + set) * c + j];
        }
        dbp[set * c + j] = static_cast<float>(s1);
        dsp[set * c + j] = static_cast<float>(s2);
      }
    return ffi::Error::Success();
  }
  // Per sample and channel: sum dy and sum dy xhat, for dbeta and dgamma.
  std::vector<double> s1(n.batch * n.channels), s2(n.batch * n.channels);
  const float* bp = bias.typed_data();
  SampleChunks(pool, n.batch).run(pool, [&](long, long b0, long b1) {
    std::vector<float> block(n.channels), mu(n.channels), r(n.channels), ma(n.channels),
        mb(n.channels);
    std::vector<double> weighted(n.channels);
    std::unique_ptr<Scratch> dz;  // with silu: the gradient before it
    if (with_silu) dz = std::make_unique<Scratch>(size, false);
    for (long b = b0; b < b1; ++b) {
      const float *xb = xp + b * size, *gb = gp + b * size;
      const float *gamma = sp + b / per_set * n.channels, *beta = bp + b / per_set * n.channels;
      double *d1 = s1.data() + b * n.channels, *d2 = s2.data() + b * n.channels;
      for (long c = 0; c < n.channels; ++c) {
        mu[c] = mp[b * n.groups + c / k];
        r[c] = rp[b * n.groups + c / k];
      }
      if (with_silu) {  // z recomputed, then dy silu'(z)
        float* z = dz->data();
        for (long p = 0; p < n.pixels; ++p)
          for (long c = 0; c < n.channels; ++c)
            z[p * n.channels + c] =
                (xb[p * n.channels + c] - mu[c]) * (gamma[c] * r[c]) + beta[c];
        silu_grad(gb, z, size);
        gb = z;
      }
      channel_sums(n, block.data(), d1, [&](long p, long c) { return gb[p * n.channels + c]; });
      channel_sums(n, block.data(), d2, [&](long p, long c) {
        return gb[p * n.channels + c] * ((xb[p * n.channels + c] - mu[c]) * r[c]);
      });
      for (long c = 0; c < n.channels; ++c) weighted[c] = gamma[c] * d1[c];
      group_means(n, weighted.data(), ma.data());
      for (long c = 0; c < n.channels; ++c) weighted[c] = gamma[c] * d2[c];
      group_means(n, weighted.data(), mb.data());
      float* db = dxp + b * size;
      for (long p = 0; p < n.pixels; ++p) {
        const float *row = xb + p * n.channels, *grow = gb + p * n.channels;
        float* out = db + p * n.channels;
        for (long c = 0; c < n.channels; ++c)
          out[c] = r[c] * (grow[c] * gamma[c] - ma[c] - (row[c] - mu[c]) * r[c] * mb[c]);
      }
    }
  });
  for (long set = 0; set < n.sets; ++set)  // the samples' sums added in double, per set
    for (long c = 0; c < n.channels; ++c) {
      double t1 = 0, t2 = 0;
      for (long b = set * per_set; b < (set + 1) * per_set; ++b) {
        t1 += s1[b * n.channels + c];
        t2 += s2[b * n.channels + c];
      }
      dbp[set * n.channels + c] = static_cast<float>(t1);
      dsp[set * n.channels + c] = static_cast<float>(t2);
    }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Ip2pNormForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("eps")
                                  .Attr<bool>("silu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Ip2pNormBackward, Backward,
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
                                  .Attr<int64_t>("groups")
                                  .Attr<bool>("silu"));
