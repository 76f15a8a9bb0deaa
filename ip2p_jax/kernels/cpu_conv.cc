// 3x3 convolutions, stride 1, padding 1, NHWC / HWIO, float32, as XLA FFI handlers:
// ``ip2p_conv3x3`` (the forward, and with ``flip`` the input gradient: the forward with
// the kernel flipped and transposed) and ``ip2p_conv3x3_filter`` (the kernel gradient).
// Leading axes are groups under vmap: images ``[..., H, W, C]`` (all leading axes one
// batch) split evenly over the kernels ``[..., 3, 3, Cin, Cout]``.
//
// XLA:CPU runs these at 60-80 GFLOP/s on two cores where the channels are 64 or fewer
// (PyTorch's oneDNN: ~150; BENCHMARKS.md). Here the images are zero-padded once into one
// stack (stack_images). The forward is one indirect product (cpu_common.h's
// ``gemm_rows``): each output pixel's tap (dy, dx) is a row of Cin floats of the stack at
// the pixel's own offset plus (dy (W + 2) + dx) pixels, its accumulators held in
// registers across all 9 taps, the output written in place. The kernel gradient is 9
// products ``x_t^T dy`` over the stacked pixels, computed over the padded width (two
// junk columns a row and one junk row an image, where dy is laid out as zeros) so that
// each tap reads the stack as one matrix; images of at most 64 pixels gather their
// neighbourhoods (im2col) instead.
#include <algorithm>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace ip2p;

struct Image {
  long batch, height, width, channels;  // batch: every image, all groups
  long padded_width() const { return width + 2; }
  // Rows of the stack (stack_images): an image's H rows and the zero row above it.
  long stacked_rows(long images) const { return images * (height + 1); }
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

// Every image zero-padded and stacked into one matrix of pixels (rows of ``channels``
// floats): image n takes stacked rows [n (H + 1), (n + 1)(H + 1)), a zero row (its top
// padding and the bottom padding of the image before) then its H rows, each W + 2 pixels
// with a zero pixel at either end; three zero rows close the stack (the last image's
// bottom padding, and slack: the kernel gradient's junk pixels of the last row read two
// pixels past it). A product's rows are output pixels of every image at once, so a small
// image does not read the whole filter for its few pixels.
void stack_images(ffi::ThreadPool& pool, const Image& s, const float* x, float* stack) {
  const long pw = s.padded_width(), c = s.channels, rows = s.stacked_rows(s.batch);
  parallel_for(pool, s.batch, [&](long n) {
    float* image = stack + s.stacked_rows(n) * pw * c;
    std::fill(image, image + pw * c, 0.0f);
    for (long y = 0; y < s.height; ++y) {
      float* row = image + (y + 1) * pw * c;
      std::fill(row, row + c, 0.0f);
      std::memcpy(row + c, x + ((n * s.height + y) * s.width) * c, s.width * c * sizeof(float));
      std::fill(row + (pw - 1) * c, row + pw * c, 0.0f);
    }
  });
  std::fill(stack + rows * pw * c, stack + (rows + 3) * pw * c, 0.0f);
}

// The taps' offsets into a padded image, in floats.
std::array<long, 9> tap_offsets(const Image& s) {
  std::array<long, 9> off;
  for (long t = 0; t < 9; ++t) off[t] = (t / 3 * s.padded_width() + t % 3) * s.channels;
  return off;
}

// The kernel gradients of images of at most this many pixels gather their 3x3
// neighbourhoods (im2col): over the padded width, a 4 x 4 image would sum 5 x 6 pixels
// for its 16 and an 8 x 8 one 9 x 10 for 64.
constexpr long kIm2colPixels = 64;

// Every pixel's 3x3 neighbourhood as a row of 9 C floats, tap-major (zeros outside the
// image): ``cols [batch H W][9 C]``, so that the convolution is one product with the
// kernel read as a [9 C, Cout] matrix.
void im2col(ffi::ThreadPool& pool, const Image& s, const float* x, float* cols) {
  const long c = s.channels, h = s.height, w = s.width;
  parallel_for(pool, s.batch, [&](long n) {
    for (long y = 0; y < h; ++y)
      for (long xx = 0; xx < w; ++xx) {
        float* row = cols + ((n * h + y) * w + xx) * 9 * c;
        for (long t = 0; t < 9; ++t) {
          const long sy = y + t / 3 - 1, sx = xx + t % 3 - 1;
          if (sy < 0 || sy >= h || sx < 0 || sx >= w)
            std::fill(row + t * c, row + (t + 1) * c, 0.0f);
          else
            std::memcpy(row + t * c, x + ((n * h + sy) * w + sx) * c, c * sizeof(float));
        }
      }
  });
}

// Tasks for a product over ``rows`` rows a kernel (of ``row_pixels`` output pixels each)
// and ``cout`` columns: (kernel, block of output channels, chunk of rows), enough for
// every thread. Few pixels split their output channels first (each task then reads only
// its block of the filter), then their rows.
struct Split {
  struct Task {
    long group, c0, nc, r0, r1;  // kernel, output channels [c0, c0 + nc), rows [r0, r1)
    bool empty() const { return r0 >= r1 || nc <= 0; }
  };
  long rows, cout, blocks, block, chunks, chunk;
  Split(ffi::ThreadPool& pool, Tile tile, long groups, long rows, long row_pixels, long cout)
      : rows(rows), cout(cout) {
    const long want = 4 * std::max<long>(pool.num_threads(), 1);
    const long width = tile.vectors * VW, widths = (cout + width - 1) / width;
    blocks = std::clamp<long>(want * 512 / std::max<long>(groups * rows * row_pixels, 1), 1,
                              std::min(widths, want));
    block = (widths + blocks - 1) / blocks * width;
    chunks = std::min(rows, std::max<long>(1, (want + groups * blocks - 1) / (groups * blocks)));
    chunk = (rows + chunks - 1) / chunks;
  }
  long tasks(long groups) const { return groups * blocks * chunks; }
  Task at(long task) const {
    const long c0 = task / chunks % blocks * block, r0 = task % chunks * chunk;
    return Task{task / (blocks * chunks), c0, std::min(block, cout - c0), r0,
                std::min(rows, r0 + chunk)};
  }
};

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
  float* yp = y->typed_data();
  // Every output pixel's neighbourhood read in place from the stack (an indirect
  // product: no junk pixels computed, the output written where it belongs).
  const long pixels = per_group * s.height * s.width;
  const Split split(pool, tile, groups, per_group * s.height, s.width, cout);
  Scratch stack((s.stacked_rows(s.batch) + 3) * pw * s.channels, false);
  stack_images(pool, s, x.typed_data(), stack.data());
  std::vector<long> at;  // pixel -> its top-left tap in the stack
  try {  // no exception may cross XLA's C API
    at.resize(s.batch * s.height * s.width);
  } catch (const std::bad_alloc&) {
    return ffi::Error::Internal("out of memory for the pixels' offsets");
  }
  parallel_for(pool, s.batch, [&](long n) {
    for (long yy = 0; yy < s.height; ++yy)
      for (long xx = 0; xx < s.width; ++xx)
        at[(n * s.height + yy) * s.width + xx] =
            ((s.stacked_rows(n) + yy) * pw + xx) * s.channels;
  });
  const auto off = tap_offsets(s);
  parallel_for(pool, split.tasks(groups), [&](long task) {
    const Split::Task t = split.at(task);
    if (t.empty()) return;
    const long p0 = t.group * pixels + t.r0 * s.width, count = (t.r1 - t.r0) * s.width;
    gemm_rows(tile, count, t.nc, s.channels, stack.data(), at.data() + p0,
              wp + t.group * kernel + t.c0, cout, yp + p0 * cout + t.c0, cout, false,
              Taps{9, off.data(), s.channels * cout});
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
  const long threads = std::max<long>(pool.num_threads(), 1);
  if (s.height * s.width <= kIm2colPixels) {  // dw [9 Cin, Cout] = cols^T dy
    const long pixels = per_group * s.height * s.width, k = 9 * cin;
    Scratch cols(s.batch * s.height * s.width * k, false);
    im2col(pool, s, x.typed_data(), cols.data());
    const long block = round_up((k + 4 * threads - 1) / (4 * threads), W);
    const long blocks = (k + block - 1) / block;
    parallel_for(pool, groups * blocks, [&](long task) {
      const long g = task / blocks, r0 = task % blocks * block, rb = std::min(block, k - r0);
      gemm(tile, rb, cout, pixels, cols.data() + g * pixels * k + r0, 1, k,
           dy.typed_data() + g * pixels * cout, cout, 0, wp + (g * k + r0) * cout, cout, false);
    });
    return ffi::Error::Success();
  }
  const long rows = s.stacked_rows(per_group), all_rows = s.stacked_rows(s.batch);
  // The images stacked as the forward reads them, and dy laid out like the forward's
  // output over the stack, zero in its junk rows and columns.
  Scratch stack((all_rows + 3) * pw * cin, false), grads(all_rows * pw * cout, false);
  stack_images(pool, s, x.typed_data(), stack.data());
  const float* gp = dy.typed_data();
  parallel_for(pool, s.batch, [&](long n) {
    float* g = grads.data() + s.stacked_rows(n) * pw * cout;
    for (long yy = 0; yy < s.height; ++yy) {
      std::memcpy(g + yy * pw * cout, gp + ((n * s.height + yy) * s.width) * cout,
                  s.width * cout * sizeof(float));
      std::fill(g + (yy * pw + s.width) * cout, g + (yy + 1) * pw * cout, 0.0f);
    }
    std::fill(g + s.height * pw * cout, g + (s.height + 1) * pw * cout, 0.0f);
  });
  // Tasks: (kernel, tap, block of input channels), each owning its rows of dw.
  const auto off = tap_offsets(s);
  const long split = std::clamp<long>((8 * threads + 8) / 9, 1, cin / W);
  const long block = (cin + split - 1) / split, blocks = (cin + block - 1) / block;
  parallel_for(pool, groups * 9 * blocks, [&](long task) {
    const long g = task / (9 * blocks), t = task / blocks % 9, c0 = task % blocks * block;
    const long cb = std::min(block, cin - c0);
    gemm(tile, cb, cout, rows * pw, stack.data() + g * rows * pw * cin + off[t] + c0, 1, cin,
         grads.data() + g * rows * pw * cout, cout, 0, wp + ((g * 9 + t) * cin + c0) * cout,
         cout, false);
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
