// 3x3 convolutions, stride 1, padding 1, NHWC / HWIO, float32, as XLA FFI handlers:
// ``ip2p_conv3x3`` (the forward, and with ``flip`` the input gradient: the forward with
// the kernel flipped and transposed) and ``ip2p_conv3x3_filter`` (the kernel gradient).
// Leading axes are groups under vmap: images ``[..., H, W, C]`` (all leading axes one
// batch) split evenly over the kernels ``[..., 3, 3, Cin, Cout]``.
//
// XLA:CPU runs these at 60-80 GFLOP/s on two cores where the channels are 64 or fewer
// (PyTorch's oneDNN: ~150; BENCHMARKS.md). Here an image is zero-padded to
// (H + 2) x (W + 2) once, and the output is computed over the padded width (two junk
// columns a row, dropped on the way out) so that every tap (dy, dx) reads the padded
// input as one matrix with rows Cin apart, shifted by (dy (W + 2) + dx) pixels: the 9
// taps are one product of cpu_common.h's ``gemm`` with its accumulators held in
// registers across all of them. The kernel gradient is 9 products ``x_t^T dy`` over
// the padded pixels (the junk columns of dy are zero).
#include <algorithm>
#include <cstring>
#include <string>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace ip2p;

struct Image {
  long batch, height, width, channels;  // batch: every image, all groups
  long padded_width() const { return width + 2; }
  // The padded image's pixels, plus a row of slack: the junk outputs of the last row
  // read up to two pixels past the padded image.
  long padded_pixels(long rows) const { return (rows + 3) * padded_width(); }
};

Image image_of(ffi::Buffer<ffi::F32>& x) {
  auto d = x.dimensions();
  const long r = d.size();
  long batch = 1;
  for (long i = 0; i + 3 < r; ++i) batch *= d[i];
  return Image{batch, d[r - 3], d[r - 2], d[r - 1]};
}

// The number of kernels stacked in ``[..., 3, 3, Cin, Cout]``.
long groups_of(ffi::Span<const int64_t> d) {
  long g = 1;
  for (long i = 0; i + 4 < static_cast<long>(d.size()); ++i) g *= d[i];
  return g;
}

// Rows [y0 - 1, y1 + 1) of image n, zero outside it, into ``pad`` as
// [(y1 - y0 + 2) x (W + 2)] pixels of C channels.
void pad_rows(const Image& s, const float* x, long n, long y0, long y1, float* pad) {
  const long pw = s.padded_width(), c = s.channels;
  std::fill(pad, pad + s.padded_pixels(y1 - y0) * c, 0.0f);
  for (long y = std::max(0L, y0 - 1); y < std::min(s.height, y1 + 1); ++y)
    std::memcpy(pad + ((y - y0 + 1) * pw + 1) * c, x + ((n * s.height + y) * s.width) * c,
                s.width * c * sizeof(float));
}

// The taps' offsets into a padded image, in floats.
std::array<long, 9> tap_offsets(const Image& s) {
  std::array<long, 9> off;
  for (long t = 0; t < 9; ++t) off[t] = (t / 3 * s.padded_width() + t % 3) * s.channels;
  return off;
}

ffi::Error check(const Image& s, long out_channels, long groups) {
  if (s.channels % W != 0 || out_channels % W != 0 || s.channels == 0 || out_channels == 0)
    return ffi::Error::InvalidArgument("channels must be positive multiples of 8, got " +
                                       std::to_string(s.channels) + " -> " +
                                       std::to_string(out_channels));
  if (s.batch % groups != 0)
    return ffi::Error::InvalidArgument(std::to_string(s.batch) + " images do not split over " +
                                       std::to_string(groups) + " kernels");
  return ffi::Error::Success();
}

// With ``flip`` the kernel is given as a forward's, [..., 3, 3, Cout, Cin], and used
// flipped and transposed (the input gradient's kernel), rearranged here once a call:
// XLA's transpose of it ran at a quarter of a GB/s.
ffi::Error Conv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                ffi::ResultBuffer<ffi::F32> y, bool flip) {
  const Image s = image_of(x);
  auto wd = w.dimensions();
  const long cout = flip ? wd[wd.size() - 2] : wd.back(), pw = s.padded_width();
  const long groups = groups_of(wd), kernel = 9 * s.channels * cout;
  if (y->element_count() == 0) return ffi::Error::Success();  // nothing to write
  if (auto e = check(s, cout, groups); e.failure()) return e;
  if ((flip ? wd.back() : wd[wd.size() - 2]) != s.channels)
    return ffi::Error::InvalidArgument("the kernel's input channels must be the image's");
  std::unique_ptr<Scratch> flipped;
  const float* wp = w.typed_data();
  if (flip) {  // flipped[g][t][ci][co] = w[g][8 - t][co][ci]
    flipped = std::make_unique<Scratch>(groups * kernel, false);
    float* f = flipped->data();
    parallel_for(pool, groups * 9, [&](long gt) {
      const float* src = wp + (gt / 9 * 9 + 8 - gt % 9) * kernel / 9;
      float* dst = f + gt * (kernel / 9);
      for (long co0 = 0; co0 < cout; co0 += W)  // 8 x 8 blocks: both sides in cache lines
        for (long ci = 0; ci < s.channels; ++ci)
          for (long co = co0; co < co0 + W; ++co) dst[ci * cout + co] = src[co * s.channels + ci];
    });
    wp = f;
  }
  const long per_group = s.batch / groups;
  const Tile tile = Tile::for_width(cout);
  // Tasks: (image, block of output channels, chunk of rows), enough for every thread.
  // Few images split their output channels first (each task then reads only its block
  // of the filter: small images of many channels read the whole filter per few rows
  // otherwise), then their rows (a chunk at least a few rows tall).
  const long want = 4 * std::max<long>(pool.num_threads(), 1);
  const long width = tile.vectors * VW, widths = (cout + width - 1) / width;
  const long blocks = std::min(widths, std::max<long>(1, (want + s.batch - 1) / s.batch));
  const long block = (widths + blocks - 1) / blocks * width;
  const long chunks =
      std::min(s.height, std::max<long>(1, (want + s.batch * blocks - 1) / (s.batch * blocks)));
  const long rows = (s.height + chunks - 1) / chunks;
  const auto off = tap_offsets(s);
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  parallel_for(pool, s.batch * blocks * chunks, [&](long task) {
    const long n = task / (blocks * chunks), c0 = task / chunks % blocks * block;
    const long y0 = task % chunks * rows, y1 = std::min(s.height, y0 + rows);
    const long nc = std::min(block, cout - c0);
    if (y0 >= y1 || nc <= 0) return;
    Scratch pad(s.padded_pixels(y1 - y0) * s.channels, false),
        out((y1 - y0) * pw * nc, false);  // pad_rows and the product write all of them
    pad_rows(s, xp, n, y0, y1, pad.data());
    gemm(tile, (y1 - y0) * pw, nc, s.channels, pad.data(), s.channels, 1,
         wp + n / per_group * kernel + c0, cout, 0, out.data(), nc, false,
         Taps{9, off.data(), s.channels * cout});
    for (long yy = y0; yy < y1; ++yy)
      for (long xx = 0; xx < s.width; ++xx)
        std::memcpy(yp + ((n * s.height + yy) * s.width + xx) * cout + c0,
                    out.data() + ((yy - y0) * pw + xx) * nc, nc * sizeof(float));
  });
  return ffi::Error::Success();
}

ffi::Error Filter(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                  ffi::ResultBuffer<ffi::F32> dw) {
  const Image s = image_of(x);
  const long cout = dy.dimensions().back(), cin = s.channels, pw = s.padded_width();
  const long groups = groups_of(dw->dimensions());
  if (dw->element_count() == 0) return ffi::Error::Success();  // nothing to write
  if (auto e = check(s, cout, groups); e.failure()) return e;
  const long per_group = s.batch / groups;
  float* wp = dw->typed_data();
  if (per_group == 0 || s.height == 0 || s.width == 0) {  // no pixels: a zero gradient
    std::fill(wp, wp + groups * 9 * cin * cout, 0.0f);
    return ffi::Error::Success();
  }
  const Tile tile = Tile::for_width(cout);
  const long pixels = s.height * pw, image_floats = s.padded_pixels(s.height) * cin;
  const float *xp = x.typed_data(), *gp = dy.typed_data();
  // Every image padded once; dy laid out over the padded width with zero junk columns.
  Scratch pads(s.batch * image_floats, false), grads(s.batch * pixels * cout, false);
  parallel_for(pool, s.batch, [&](long n) {
    pad_rows(s, xp, n, 0, s.height, pads.data() + n * image_floats);
    float* g = grads.data() + n * pixels * cout;
    for (long yy = 0; yy < s.height; ++yy) {
      std::memcpy(g + yy * pw * cout, gp + ((n * s.height + yy) * s.width) * cout,
                  s.width * cout * sizeof(float));
      std::fill(g + (yy * pw + s.width) * cout, g + (yy + 1) * pw * cout, 0.0f);
    }
  });
  // Tasks: (kernel, tap, block of input channels), each owning its rows of dw.
  const auto off = tap_offsets(s);
  const long threads = std::max<long>(pool.num_threads(), 1);
  const long split = std::clamp<long>((8 * threads + 8) / 9, 1, cin / W);
  const long block = (cin + split - 1) / split, blocks = (cin + block - 1) / block;
  parallel_for(pool, groups * 9 * blocks, [&](long task) {
    const long g = task / (9 * blocks), t = task / blocks % 9, c0 = task % blocks * block;
    const long cb = std::min(block, cin - c0);
    float* out = wp + ((g * 9 + t) * cin + c0) * cout;
    for (long n = g * per_group; n < (g + 1) * per_group; ++n)
      gemm(tile, cb, cout, pixels, pads.data() + n * image_floats + off[t] + c0, 1, cin,
           grads.data() + n * pixels * cout, cout, 0, out, cout, n > g * per_group);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Ip2pConv3x3, Conv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("flip"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Ip2pConv3x3Filter, Filter,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The vector width the products were built with (build.vector_width).
extern "C" int ip2p_vector_width() { return ip2p::VW; }
