// The training step's parameter update in one pass over memory, as an XLA FFI handler
// (``ip2p_adamw_ema``): optax's clip_by_global_norm -> adamw (scale_by_adam,
// add_decayed_weights, scale_by_learning_rate) -> apply_updates, then the EMA of the
// parameters, for every leaf of the parameter tree in one call.
//
// XLA:CPU runs that chain as several loop fusions a leaf, each streaming its operands
// from memory: 49 ms for the 18M parameters of the small UNet on two cores (BENCHMARKS.md).
// Here each element's gradient, moments, parameter and EMA are read once and written
// once (nine streams: 21 ms), in place where XLA aliases the outputs to the donated
// state. The arithmetic is optax's, in its order (GCC may contract a * b + c into FMAs).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace ip2p;

// Operands per leaf: parameter, gradient, first moment, second moment, EMA; results
// per leaf: parameter, first moment, second moment, EMA.
constexpr long kIn = 5, kOut = 4;
// Elements a task updates: 128 KiB a stream, enough tasks for the pool's threads.
constexpr long kChunk = 1 << 15;

// The step's traced scalars (``scalars`` operand), in this order.
struct Step {
  float grad_norm;         // optax.tree.norm of the unclipped gradient
  float bias1, bias2;      // 1 - b1^t and 1 - b2^t
  float neg_lr;            // -learning_rate(count)
  float decay, keep;       // the EMA's decay and 1 - decay
};

struct Hyper {
  float b1, one_minus_b1, b2, one_minus_b2, eps, eps_root, weight_decay, max_norm;
};

typedef float v1 __attribute__((vector_size(4)));  // one float: the tail, the same code

template <typename V>
inline V vsqrt(V x) {  // a lane loop GCC turns into vsqrtps (with -fno-math-errno)
  V r;
  for (int i = 0; i < lanes<V>; ++i) r[i] = __builtin_sqrtf(x[i]);
  return r;
}

// Element by element in optax's order of operations (the library is built without
// fast-math: nothing is reassociated; GCC contracts some a * b + c into FMAs, so elements
// differ from XLA's by a few ulp), on vectors of type V (a float for the tail). The
// outputs may be the inputs (aliased): each element is read before it is written.
template <typename V>
inline void update(const Hyper& h, const Step& s, bool clip, const float* p, const float* g,
                   const float* m, const float* v, const float* e, float* po, float* mo,
                   float* vo, float* eo) {
  V gi = load<V>(g);
  if (clip) gi = gi / s.grad_norm * h.max_norm;
  const V pi = load<V>(p);
  const V mi = h.one_minus_b1 * gi + h.b1 * load<V>(m);
  const V vi = h.one_minus_b2 * (gi * gi) + h.b2 * load<V>(v);
  const V step = mi / s.bias1 / (vsqrt(vi / s.bias2 + h.eps_root) + h.eps);
  const V pn = pi + s.neg_lr * (step + h.weight_decay * pi);
  const V en = s.decay * load<V>(e) + s.keep * pn;
  store(mo, mi);
  store(vo, vi);
  store(po, pn);
  store(eo, en);
}

void update(const Hyper& h, const Step& s, bool clip, long n, const float* p, const float* g,
            const float* m, const float* v, const float* e, float* po, float* mo, float* vo,
            float* eo) {
  long i = 0;
  for (; i + VW <= n; i += VW)
    update<vf>(h, s, clip, p + i, g + i, m + i, v + i, e + i, po + i, mo + i, vo + i, eo + i);
  for (; i < n; ++i)
    update<v1>(h, s, clip, p + i, g + i, m + i, v + i, e + i, po + i, mo + i, vo + i, eo + i);
}

ffi::Error AdamWEma(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars, ffi::RemainingArgs args,
                    ffi::RemainingRets rets, float b1, float one_minus_b1, float b2,
                    float one_minus_b2, float eps, float eps_root, float weight_decay,
                    float max_norm) {
  if (scalars.element_count() != sizeof(Step) / sizeof(float))
    return ffi::Error::InvalidArgument("scalars must hold " +
                                       std::to_string(sizeof(Step) / sizeof(float)) + " floats");
  if (args.size() % kIn != 0 || rets.size() != args.size() / kIn * kOut)
    return ffi::Error::InvalidArgument(
        "takes (parameter, gradient, mu, nu, ema) per leaf and returns (parameter, mu, nu, "
        "ema): got " + std::to_string(args.size()) + " operands, " +
        std::to_string(rets.size()) + " results");
  Step s;
  std::memcpy(&s, scalars.typed_data(), sizeof(Step));
  const Hyper h{b1, one_minus_b1, b2, one_minus_b2, eps, eps_root, weight_decay, max_norm};
  const bool clip = !(s.grad_norm < h.max_norm);  // optax: select(norm < max, g, clipped)

  struct Leaf {
    const float* in[kIn];
    float* out[kOut];
    long size;
  };
  struct Task {
    long leaf, begin, end;
  };
  const long leaves = static_cast<long>(args.size() / kIn);
  std::vector<Leaf> leaf;
  std::vector<Task> tasks;
  try {  // no exception may cross XLA's C API
    leaf.resize(leaves);
    long chunks = 0;
    for (long l = 0; l < leaves; ++l) {
      auto b = args.get<ffi::Buffer<ffi::F32>>(l * kIn);
      if (b.has_error()) return b.error();
      chunks += (static_cast<long>(b->element_count()) + kChunk - 1) / kChunk;
    }
    tasks.reserve(chunks);
  } catch (const std::bad_alloc&) {
    return ffi::Error::Internal("out of memory for the update's task list");
  }
  for (long l = 0; l < leaves; ++l) {
    long size = -1;
    for (long k = 0; k < kIn; ++k) {
      auto b = args.get<ffi::Buffer<ffi::F32>>(l * kIn + k);
      if (b.has_error()) return b.error();
      if (size >= 0 && static_cast<long>(b->element_count()) != size)
        return ffi::Error::InvalidArgument("leaf " + std::to_string(l) +
                                           ": its five operands must have one size");
      size = static_cast<long>(b->element_count());
      leaf[l].in[k] = b->typed_data();
    }
    for (long k = 0; k < kOut; ++k) {
      auto b = rets.get<ffi::Buffer<ffi::F32>>(l * kOut + k);
      if (b.has_error()) return b.error();
      if (static_cast<long>((*b)->element_count()) != size)
        return ffi::Error::InvalidArgument("leaf " + std::to_string(l) +
                                           ": results must have its operands' size");
      leaf[l].out[k] = (*b)->typed_data();
    }
    leaf[l].size = size;
    for (long b = 0; b < size; b += kChunk) tasks.push_back({l, b, std::min(size, b + kChunk)});
  }
  parallel_for(pool, static_cast<long>(tasks.size()), [&](long t) {
    const Task& k = tasks[t];
    const Leaf& l = leaf[k.leaf];
    const long b = k.begin;
    update(h, s, clip, k.end - b, l.in[0] + b, l.in[1] + b, l.in[2] + b, l.in[3] + b,
           l.in[4] + b, l.out[0] + b, l.out[1] + b, l.out[2] + b, l.out[3] + b);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Ip2pAdamWEma, AdamWEma,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<float>("b1")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("eps_root")
                                  .Attr<float>("weight_decay")
                                  .Attr<float>("max_norm"));
