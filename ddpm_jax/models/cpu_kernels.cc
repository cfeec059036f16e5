// SiLU and the article's LayerNorm, forward and backward, for XLA:CPU through the XLA FFI
// (ddpm_jax/models/cpu_kernels.py builds and registers them). XLA:CPU's loop emitter vectorises
// an elementwise fusion that holds a broadcast (a bias, a constant, a per-example mean) along its
// innermost dimension only: a few lanes for this project's 10- and 20-channel activations. These
// loops run over flat buffers; gcc -O3 -march=native with cpu_kernels.py's flags vectorises every
// one of them, on AVX2 and AVX-512 (check with -fopt-info-vec).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// exp(x) = 2^k e^r with k = round(x / ln 2) and |r| <= ln(2) / 2; e^r by its Taylor series to
// r^7 (truncation under 1e-8 relative). Branch-free and call-free, so the loops vectorise.
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // keeps 2^k a normal float
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (here |x / ln 2| < 2^7).
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - k * 0.693145751953125f) - k * 1.42860682030941723e-6f;  // ln 2 in two parts
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // the float 2^k
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}


constexpr size_t kChunk = 1 << 16;  // elements per chunk of the elementwise loops

// Runs body(begin, end) over [0, n) in chunks, on the calling thread and on one task of XLA's
// intra-op thread pool: whichever is free takes the next chunk. The caller returns once every
// chunk is done; a helper task that starts late finds none left (the state outlives the call).
template <typename Body>
void parallel_for(ffi::ThreadPool& pool, size_t n, size_t chunk, Body body) {
  const size_t chunks = (n + chunk - 1) / chunk;
  if (chunks < 2 || pool.num_threads() < 2) {
    body(size_t{0}, n);
    return;
  }
  struct State {
    std::atomic<size_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, chunk, chunks, body]() {
    for (size_t c; (c = state->next.fetch_add(1)) < chunks;) {
      body(c * chunk, std::min(n, (c + 1) * chunk));
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  auto helper = work;
  pool.Schedule(std::move(helper));
  work();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// Runs body(i, n, tile) over [0, size) in runs of n <= channels * 16 elements starting at
// multiples of that (on the pool, as parallel_for): `tile` holds the bias, repeated to the same
// length, so tile[k] is the bias of element i + k (the bias runs along the last axis) and a
// loop over a run vectorises whatever the channel count.
template <typename Body>
void for_each_run(ffi::ThreadPool& pool, size_t size, const float* bias, size_t channels, Body body) {
  if (size == 0 || channels == 0) return;  // an empty array (no channels: no elements)
  const size_t run = channels * 16;
  std::vector<float> tile(run);
  for (size_t k = 0; k < run; ++k) tile[k] = bias[k % channels];
  const float* tile_data = tile.data();  // the helper task finds no chunk left once this returns
  parallel_for(pool, size, std::max<size_t>(1, kChunk / run) * run, [=](size_t begin, size_t end) {
    for (size_t i = begin; i < end; i += run) body(i, std::min(run, end - i), tile_data);
  });
}

constexpr float kNoBias[1] = {0.0f};

// y = z * sigmoid(z) with z = x + bias.
ffi::Error BiasSilu(ffi::ThreadPool& pool, const float* x, size_t size, const float* bias, size_t channels,
                    float* y) {
  for_each_run(pool, size, bias, channels, [x, y](size_t i, size_t n, const float* __restrict tile) {
    const float* __restrict in = x + i;
    float* __restrict out = y + i;
    for (size_t k = 0; k < n; ++k) {
      const float z = in[k] + tile[k];
      out[k] = z / (1.0f + exp_approx(-z));
    }
  });
  return ffi::Error::Success();
}

// y = z * sigmoid(z) and sigmoid(z), which the gradient needs: dy/dz = s + y (1 - s).
ffi::Error BiasSiluAndSigmoid(ffi::ThreadPool& pool, const float* x, size_t size, const float* bias,
                              size_t channels, float* y, float* s) {
  for_each_run(pool, size, bias, channels, [x, y, s](size_t i, size_t n, const float* __restrict tile) {
    const float* __restrict in = x + i;
    float* __restrict out = y + i;
    float* __restrict sig = s + i;
    for (size_t k = 0; k < n; ++k) {
      const float z = in[k] + tile[k], sigmoid = 1.0f / (1.0f + exp_approx(-z));
      sig[k] = sigmoid;
      out[k] = z * sigmoid;
    }
  });
  return ffi::Error::Success();
}

// The FFI's entry points: SiLU alone, and SiLU of x + bias (bias: the last axis's size).
ffi::Error Silu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  return BiasSilu(pool, x.typed_data(), x.element_count(), kNoBias, 1, y->typed_data());
}

ffi::Error SiluAndSigmoid(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                          ffi::ResultBuffer<ffi::F32> s) {
  return BiasSiluAndSigmoid(pool, x.typed_data(), x.element_count(), kNoBias, 1, y->typed_data(), s->typed_data());
}

ffi::Error BiasSiluEntry(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> bias,
                         ffi::ResultBuffer<ffi::F32> y) {
  return BiasSilu(pool, x.typed_data(), x.element_count(), bias.typed_data(), bias.element_count(),
                  y->typed_data());
}

ffi::Error BiasSiluAndSigmoidEntry(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> bias,
                                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> s) {
  return BiasSiluAndSigmoid(pool, x.typed_data(), x.element_count(), bias.typed_data(), bias.element_count(),
                            y->typed_data(), s->typed_data());
}

// The gradient of SiLU from its outputs: dx = dy * (s + y * (1 - s)).
ffi::Error SiluGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> s, ffi::Buffer<ffi::F32> dy,
                    ffi::ResultBuffer<ffi::F32> dx) {
  const float* __restrict out = y.typed_data();
  const float* __restrict sig = s.typed_data();
  const float* __restrict g = dy.typed_data();
  float* __restrict grad = dx->typed_data();
  parallel_for(pool, y.element_count(), kChunk, [out, sig, g, grad](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) grad[i] = g[i] * (sig[i] + out[i] * (1.0f - sig[i]));
  });
  return ffi::Error::Success();
}

// Rows of a normalisation per chunk of parallel_for: about kChunk elements.
inline size_t rows_per_chunk(size_t d) { return std::max<size_t>(1, kChunk / std::max<size_t>(1, d)); }

// Layer normalisation of each row of x (rows of d = scale's size elements) with an elementwise
// scale and bias, as torch.nn.LayerNorm over (C, H, W): exact two-pass variance, biased.
// Also returns each row's mean and 1 / sqrt(var + eps), for the gradient. Rows run on the pool.
ffi::Error LayerNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                     ffi::Buffer<ffi::F32> bias, float eps, ffi::ResultBuffer<ffi::F32> y,
                     ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd) {
  const size_t d = scale.element_count(), rows = d ? x.element_count() / d : 0;
  const float* __restrict w = scale.typed_data();
  const float* __restrict b = bias.typed_data();
  const float* x_data = x.typed_data();
  float *y_data = y->typed_data(), *means = mean->typed_data(), *rstds = rstd->typed_data();
  parallel_for(pool, rows, rows_per_chunk(d), [=](size_t row_begin, size_t row_end) {
    for (size_t r = row_begin; r < row_end; ++r) {
      const float* __restrict in = x_data + r * d;
      float* __restrict out = y_data + r * d;
      // The reductions by omp simd (-fopenmp-simd): vector partial sums, as XLA's reduce.
      float sum = 0.0f, sum_sq = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (size_t i = 0; i < d; ++i) sum += in[i];
      const float m = sum / d;
#pragma omp simd reduction(+ : sum_sq)
      for (size_t i = 0; i < d; ++i) sum_sq += (in[i] - m) * (in[i] - m);
      const float s = 1.0f / std::sqrt(sum_sq / d + eps);
#pragma omp simd
      for (size_t i = 0; i < d; ++i) out[i] = (in[i] - m) * s * w[i] + b[i];
      means[r] = m;
      rstds[r] = s;
    }
  });
  return ffi::Error::Success();
}

// The gradient of LayerNorm: with xh = (x - mean) * rstd and g = dy * scale,
// dx = rstd * (g - mean(g) - xh * mean(g * xh)); dscale = sum over rows of dy * xh; dbias = sum of dy.
// Each chunk of rows sums its own dscale and dbias, added up at the end.
ffi::Error LayerNormGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                         ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                         ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                         ffi::ResultBuffer<ffi::F32> dbias) {
  const size_t d = scale.element_count(), rows = d ? x.element_count() / d : 0;
  const size_t chunk = rows_per_chunk(d), chunks = (rows + chunk - 1) / chunk;
  std::vector<float> partials(chunks * 2 * d, 0.0f);  // per chunk: dscale, then dbias
  const float* __restrict w = scale.typed_data();
  const float *x_data = x.typed_data(), *dy_data = dy.typed_data();
  const float *means = mean.typed_data(), *rstds = rstd.typed_data();
  float *dx_data = dx->typed_data(), *partial_data = partials.data();
  parallel_for(pool, rows, chunk, [=](size_t row_begin, size_t row_end) {
    float* __restrict dw = partial_data + row_begin / chunk * 2 * d;
    float* __restrict db = dw + d;
    for (size_t r = row_begin; r < row_end; ++r) {
      const float* __restrict in = x_data + r * d;
      const float* __restrict g = dy_data + r * d;
      float* __restrict out = dx_data + r * d;
      const float m = means[r], s = rstds[r];
      float sum_g = 0.0f, sum_gx = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
      for (size_t i = 0; i < d; ++i) {
        const float gw = g[i] * w[i];
        sum_g += gw;
        sum_gx += gw * (in[i] - m) * s;
      }
      const float mean_g = sum_g / d, mean_gx = sum_gx / d;
#pragma omp simd
      for (size_t i = 0; i < d; ++i) {
        const float xh = (in[i] - m) * s;
        out[i] = s * (g[i] * w[i] - mean_g - xh * mean_gx);
        dw[i] += g[i] * xh;
        db[i] += g[i];
      }
    }
  });
  float* __restrict dw = dscale->typed_data();
  float* __restrict db = dbias->typed_data();
  std::fill(dw, dw + d, 0.0f);
  std::fill(db, db + d, 0.0f);
  for (size_t c = 0; c < chunks; ++c) {
    const float* __restrict partial = partial_data + c * 2 * d;
#pragma omp simd
    for (size_t i = 0; i < d; ++i) {
      dw[i] += partial[i];
      db[i] += partial[d + i];
    }
  }
  return ffi::Error::Success();
}

// A stride-1 convolution with a square k x k kernel and p pixels of zero padding on every side,
// NHWC input (B, H, W, C), HWIO kernel (k, k, C, O), no bias: XLA:CPU runs convolutions of 10-40
// channels at a fraction of the vector unit's rate (benchmarks/conv_layers.py). Direct form: each
// image is copied into a zero-bordered buffer of (H + 2p) x (W + 2p) pixels, in which output
// pixel q = y (W + 2p) + x reads tap (ky, kx) at pixel q + ky (W + 2p) + kx: one loop over q
// covers every row (the outputs at the k - 1 columns past each row's last are computed and
// dropped). A tile of P pixels x G vectors of output channels stays in registers; per tap and
// input channel it loads G kernel vectors and P input values (broadcast), then P x G vector
// multiply-adds. Output channels are padded to whole vectors in the packed kernel.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kAccumulators = 24;  // of 32 vector registers
#else
constexpr int kLanes = 8;
constexpr int kAccumulators = 12;  // of 16
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
constexpr int kMaxGroup = 4;  // vectors of output channels per tile

// Keeps a loaded vector in a register: gcc would otherwise fold its load into each multiply-add
// that uses it, loading it again for each (the loads, not the multiply-adds, then bound a tile).
inline void in_register(Vec& v) {
#if defined(__AVX2__)
  asm("" : "+v"(v));
#endif
}

// The vector width the kernels were compiled for: cpu_kernels._kernel_pays picks by it.
extern "C" int DdpmJaxVectorLanes() { return kLanes; }

// The first n (0 < n <= kLanes) floats at src, zeros in the other lanes: one masked load.
inline Vec load_first(const float* src, size_t n) {
  Vec v;
  if (n == kLanes) {
    std::memcpy(&v, src, sizeof v);
    return v;
  }
#if defined(__AVX512F__)
  v = reinterpret_cast<Vec>(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), src));
#elif defined(__AVX2__)
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  v = reinterpret_cast<Vec>(_mm256_maskload_ps(src, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane)));
#else
  v = Vec{};
  std::memcpy(&v, src, n * sizeof(float));
#endif
  return v;
}

// The first n (0 < n <= kLanes) floats of v to dst, which may end right after them: one masked
// store (a memcpy of a variable length is a library call per pixel).
inline void store_first(float* dst, Vec v, size_t n) {
  if (n == kLanes) {
    std::memcpy(dst, &v, sizeof v);
    return;
  }
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << n) - 1), reinterpret_cast<__m512>(v));
#elif defined(__AVX2__)
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  _mm256_maskstore_ps(dst, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane),
                      reinterpret_cast<__m256>(v));
#else
  std::memcpy(dst, &v, n * sizeof(float));
#endif
}

// The shapes of a convolution and of its images' padded buffers.
struct ConvGeometry {
  size_t batch, height, width, c, o, k, pad;
  size_t padded_width, out_height, out_width, q_end, vectors, groups;

  ConvGeometry(size_t batch, size_t height, size_t width, size_t c, size_t o, size_t k, size_t pad)
      : batch(batch), height(height), width(width), c(c), o(o), k(k), pad(pad), padded_width(width + 2 * pad),
        out_height(height + 2 * pad + 1 - k), out_width(width + 2 * pad + 1 - k),
        q_end((out_height - 1) * padded_width + out_width), vectors((o + kLanes - 1) / kLanes),
        groups((vectors + kMaxGroup - 1) / kMaxGroup) {}

  // Pixels of an image's buffer: the padded image, then zeros for a tile's reads past q_end.
  size_t buffer_pixels() const { return (height + 2 * pad) * padded_width + kAccumulators; }

  // Image b of x into its zeroed buffer (the borders stay zero).
  void fill(float* buffer, const float* x, size_t b) const {
    for (size_t row = 0; row < height; ++row)
      std::memcpy(buffer + ((row + pad) * padded_width + pad) * c, x + (b * height + row) * width * c,
                  width * c * sizeof(float));
  }

  size_t group_size(size_t g) const { return std::min<size_t>(kMaxGroup, vectors - g * kMaxGroup); }
};

template <int G, int P>
void ConvRows(const ConvGeometry& geo, const float* __restrict in, const Vec* __restrict w, size_t channels,
              float* __restrict out) {
  const size_t c = geo.c, k = geo.k, padded_width = geo.padded_width;
  for (size_t q = 0; q < geo.q_end; q += P) {
    Vec acc[P][G] = {};
    for (size_t ky = 0; ky < k; ++ky) {
      for (size_t kx = 0; kx < k; ++kx) {
        const float* __restrict x = in + (q + ky * padded_width + kx) * c;
        const Vec* __restrict wt = w + (ky * k + kx) * c * G;
        for (size_t ci = 0; ci < c; ++ci) {
          Vec wv[G];
#pragma GCC unroll 8
          for (int g = 0; g < G; ++g) wv[g] = wt[ci * G + g];
#pragma GCC unroll 32
          for (int p = 0; p < P; ++p) {
            const float a = x[p * c + ci];
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) acc[p][g] += a * wv[g];
          }
        }
      }
    }
    // The tile's real pixels (not past a row's end, nor past the last), this group's channels.
    size_t y = q / padded_width, x = q % padded_width;
#pragma GCC unroll 32
    for (int p = 0; p < P; ++p, ++x) {
      if (x == padded_width) x = 0, ++y;
      if (x >= geo.out_width || q + p >= geo.q_end) continue;
      float* dst = out + (y * geo.out_width + x) * geo.o;
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g)
        if (channels > g * kLanes) store_first(dst + g * kLanes, acc[p][g], std::min<size_t>(kLanes, channels - g * kLanes));
    }
  }
}

// The planar form, for layers whose output channels fill whole vectors poorly (10 or 20 of 16
// lanes: the tiles above leave 6 of 16 lanes idle, and the FMA unit is the bound): each image is
// copied into one zero-bordered plane per input channel, and a vector holds kLanes consecutive
// pixels q of one output channel. A tile of P vectors of pixels x OB output channels stays in
// registers; per tap and input channel it loads P vectors of pixels and multiplies each by OB
// kernel values (broadcast from the HWIO kernel as it is), P x OB multiply-adds with every lane
// used. The tile is then written to the NHWC output pixel by pixel through a small buffer.
// P: as many pixel vectors as fit beside the accumulators, at most 8.
constexpr int kVectorRegisters = kLanes == 16 ? 32 : 16;
constexpr int planar_pixel_vectors(int ob) { return std::min(8, (kVectorRegisters - 1) / (ob + 1)); }
constexpr int kMaxPlanarBlock = 12;  // output channels per planar tile
constexpr size_t kPlanarSlack = 8 * kLanes;  // zeros after each plane for a last tile's reads

// Whether Conv takes the planar form: the output channels' vectors are under 80 % full and each
// output element has at least 16 multiply-adds (the copies to and from the planes are per element).
bool use_planar(const ConvGeometry& geo) {
  return 5 * geo.o < 4 * geo.vectors * kLanes && geo.k * geo.k * geo.c >= 16;
}

// Whether ConvKernelGrad takes the planar form: the output channels' vectors are under 80 % full
// (the other form's tiles hold vectors of output channels) and an image has at least 8 vectors
// of pixels (on 7 x 7 and 3 x 3 images a tile's setup and sums outweighed the fuller lanes).
bool use_planar_grad(const ConvGeometry& geo) {
  return 5 * geo.o < 4 * geo.vectors * kLanes && geo.q_end >= 8 * kLanes;
}

// n pixels of c channels at src (pixel after pixel) to channel ci's plane at dst + ci * stride,
// a float at a time in the order they lie at src. On a Zen 4 AVX-512 CPU this beat kLanes pixels
// of a channel per gather (a row's last ones masked): the kernel gradient of 28x28 10 -> 10 at
// batch 128 took 1.41 against 1.63 ms, the forward 1.21 against 1.30 ms.
void to_planes(const float* __restrict src, size_t n, size_t c, float* __restrict dst, size_t stride) {
  for (size_t xx = 0; xx < n; ++xx, src += c)
    for (size_t ci = 0; ci < c; ++ci) dst[ci * stride + xx] = src[ci];
}

template <int OB>
void ConvPlanarRows(const ConvGeometry& geo, const float* __restrict planes, size_t stride, const float* __restrict w,
                    size_t first, const int* __restrict dest, float* __restrict out) {
  constexpr int P = planar_pixel_vectors(OB);
  const size_t c = geo.c, k = geo.k, o = geo.o, padded_width = geo.padded_width;
  for (size_t q = 0; q < geo.q_end; q += P * kLanes) {
    Vec acc[P][OB] = {};
    for (size_t ky = 0; ky < k; ++ky) {
      for (size_t kx = 0; kx < k; ++kx) {
        const float* __restrict x = planes + q + ky * padded_width + kx;
        const float* __restrict wt = w + (ky * k + kx) * c * o + first;
        for (size_t ci = 0; ci < c; ++ci, x += stride, wt += o) {
          Vec in[P];
#pragma GCC unroll 8
          for (int p = 0; p < P; ++p) std::memcpy(&in[p], x + p * kLanes, sizeof(Vec));
#pragma GCC unroll 16
          for (int j = 0; j < OB; ++j) {
            const float b = wt[j];
#pragma GCC unroll 8
            for (int p = 0; p < P; ++p) acc[p][j] += in[p] * b;
          }
        }
      }
    }
    float tile[OB][P * kLanes];
#pragma GCC unroll 16
    for (int j = 0; j < OB; ++j)
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) std::memcpy(&tile[j][p * kLanes], &acc[p][j], sizeof(Vec));
    for (int l = 0; l < P * kLanes; ++l) {
      const int d = dest[q + l];  // the pixel's place in the output, -1 where it is dropped
      if (d < 0) continue;
      float* __restrict dst = out + d + first;
#pragma GCC unroll 16
      for (int j = 0; j < OB; ++j) dst[j] = tile[j][l];
    }
  }
}

void ConvPlanar(ffi::ThreadPool& pool, const ConvGeometry& geo, const float* x_data, const float* w, float* y_data) {
  const size_t c = geo.c, o = geo.o, padded_pixels = (geo.height + 2 * geo.pad) * geo.padded_width;
  const size_t stride = padded_pixels + kPlanarSlack;
  // Output channels in blocks of at most kMaxPlanarBlock, as even as can be (20 -> 10 + 10).
  const size_t blocks = (o + kMaxPlanarBlock - 1) / kMaxPlanarBlock, block = (o + blocks - 1) / blocks;
  std::vector<int> dest(geo.q_end + kPlanarSlack, -1);
  for (size_t y = 0; y < geo.out_height; ++y)
    for (size_t xx = 0; xx < geo.out_width; ++xx)
      dest[y * geo.padded_width + xx] = static_cast<int>((y * geo.out_width + xx) * o);
  const int* dest_data = dest.data();
  // A few images per chunk: each chunk zeroes its planes once (the borders and the slack stay zero).
  const size_t chunk = std::max<size_t>(1, geo.batch / (4 * std::max<int64_t>(1, pool.num_threads())));
  parallel_for(pool, geo.batch, chunk, [=, &geo](size_t begin, size_t end) {
    std::vector<float> planes(c * stride, 0.0f);
    for (size_t b = begin; b < end; ++b) {
      for (size_t row = 0; row < geo.height; ++row)
        to_planes(x_data + (b * geo.height + row) * geo.width * c, geo.width, c,
                  planes.data() + (row + geo.pad) * geo.padded_width + geo.pad, stride);
      float* out = y_data + b * geo.out_height * geo.out_width * o;
      for (size_t first = 0; first < o; first += block) {
        switch (std::min(block, o - first)) {
#define DDPM_JAX_PLANAR_BLOCK(OB) \
  case OB: ConvPlanarRows<OB>(geo, planes.data(), stride, w, first, dest_data, out); break;
          DDPM_JAX_PLANAR_BLOCK(1) DDPM_JAX_PLANAR_BLOCK(2) DDPM_JAX_PLANAR_BLOCK(3) DDPM_JAX_PLANAR_BLOCK(4)
          DDPM_JAX_PLANAR_BLOCK(5) DDPM_JAX_PLANAR_BLOCK(6) DDPM_JAX_PLANAR_BLOCK(7) DDPM_JAX_PLANAR_BLOCK(8)
          DDPM_JAX_PLANAR_BLOCK(9) DDPM_JAX_PLANAR_BLOCK(10) DDPM_JAX_PLANAR_BLOCK(11) DDPM_JAX_PLANAR_BLOCK(12)
#undef DDPM_JAX_PLANAR_BLOCK
        }
      }
    }
  });
}

ffi::Error Conv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel, int64_t padding,
                ffi::ResultBuffer<ffi::F32> y) {
  const auto dims = x.dimensions();
  const auto kdims = kernel.dimensions();
  if (dims.size() != 4 || kdims.size() != 4 || kdims[0] != kdims[1] || kdims[2] != dims[3] || padding < 0 ||
      padding >= kdims[0] || dims[1] + 2 * padding < kdims[0] || dims[2] + 2 * padding < kdims[0])
    return ffi::Error::InvalidArgument("conv: expects x (B, H, W, C), kernel (k, k, C, O), 0 <= padding < k");
  const ConvGeometry geo(dims[0], dims[1], dims[2], dims[3], kdims[3], kdims[0], padding);
  if (geo.batch * geo.out_height * geo.out_width * geo.o == 0) return ffi::Error::Success();
  if (use_planar(geo)) {
    ConvPlanar(pool, geo, x.typed_data(), kernel.typed_data(), y->typed_data());
    return ffi::Error::Success();
  }
  const size_t taps = geo.k * geo.k, c = geo.c, o = geo.o;
  // The kernel per group of output channels, [group][tap][c][its vectors], zero past channel o.
  std::vector<Vec> packed(taps * c * geo.vectors);
  float* packed_floats = reinterpret_cast<float*>(packed.data());
  std::fill(packed_floats, packed_floats + packed.size() * kLanes, 0.0f);
  const float* w = kernel.typed_data();
  for (size_t g = 0; g < geo.groups; ++g) {
    const size_t first = g * kMaxGroup * kLanes, lanes = geo.group_size(g) * kLanes;
    float* dst = packed_floats + taps * c * first;
    for (size_t row = 0; row < taps * c; ++row)
      for (size_t j = 0; j < lanes && first + j < o; ++j) dst[row * lanes + j] = w[row * o + first + j];
  }
  const float* x_data = x.typed_data();
  float* y_data = y->typed_data();
  const Vec* packed_data = packed.data();
  parallel_for(pool, geo.batch, 1, [=](size_t begin, size_t end) {
    std::vector<float> buffer(geo.buffer_pixels() * c, 0.0f);
    for (size_t b = begin; b < end; ++b) {
      geo.fill(buffer.data(), x_data, b);
      float* out = y_data + b * geo.out_height * geo.out_width * o;
      for (size_t g = 0; g < geo.groups; ++g) {
        const size_t first = g * kMaxGroup * kLanes, channels = std::min(o - first, geo.group_size(g) * kLanes);
        const Vec* wg = packed_data + taps * c * g * kMaxGroup;
        switch (geo.group_size(g)) {
          case 1: ConvRows<1, kAccumulators / 1>(geo, buffer.data(), wg, channels, out + first); break;
          case 2: ConvRows<2, kAccumulators / 2>(geo, buffer.data(), wg, channels, out + first); break;
          case 3: ConvRows<3, kAccumulators / 3>(geo, buffer.data(), wg, channels, out + first); break;
          default: ConvRows<4, kAccumulators / 4>(geo, buffer.data(), wg, channels, out + first); break;
        }
      }
    }
  });
  return ffi::Error::Success();
}

// R rows (tap, ci) of the kernel's gradient x G vectors of output channels, summed over an
// image's pixels in registers, then added to dw (rows of `vectors` vectors). Rows read the
// image at their own offsets from pixel q's channels: for inputs of under 4 channels, where a
// block spans several taps.
template <int G, int R>
void ConvKernelGradRows(const float* __restrict in, size_t c, const int* __restrict offsets, const Vec* __restrict dy,
                        size_t vectors, size_t q_end, Vec* __restrict dw) {
  Vec acc[R][G] = {};
  int off[R];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) off[r] = offsets[r];
  for (size_t q = 0; q < q_end; ++q) {
    const float* __restrict x = in + q * c;
    Vec g[G];
#pragma GCC unroll 8
    for (int j = 0; j < G; ++j) g[j] = dy[q * vectors + j];
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const float a = x[off[r]];
#pragma GCC unroll 8
      for (int j = 0; j < G; ++j) acc[r][j] += a * g[j];
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < G; ++j) dw[r * vectors + j] += acc[r][j];
}

// R consecutive input channels of one tap (its first at `in`) x G vectors of output channels:
// every row reads at a constant distance from one pointer, so the loads fold into the
// multiply-adds (the offsets above take a register each, more than there are). Adds the first
// `rows` of them to dw; the others (channels past the last) are read and dropped.
template <int G, int R>
void ConvKernelGradTapRows(const float* __restrict in, size_t c, const Vec* __restrict dy, size_t vectors,
                           size_t q_end, size_t rows, Vec* __restrict dw) {
  Vec acc[R][G] = {};
  for (size_t q = 0; q < q_end; ++q, in += c) {
    Vec g[G];
#pragma GCC unroll 8
    for (int j = 0; j < G; ++j) g[j] = dy[q * vectors + j];
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < G; ++j) acc[r][j] += in[r] * g[j];
  }
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
    if (static_cast<size_t>(r) < rows)
#pragma GCC unroll 8
      for (int j = 0; j < G; ++j) dw[r * vectors + j] += acc[r][j];
}

// Channels per block of ConvKernelGradTapRows for c input channels and G vectors of output
// channels: of the sizes whose G x R accumulators fit, the one computing the fewest rows.
constexpr int kTapBlocks[] = {24, 20, 16, 12, 10, 8, 6, 4, 3, 2};
int tap_block(size_t c, int G) {
  int best = 0;
  size_t best_rows = ~size_t{0};
  for (int r : kTapBlocks) {
    const size_t rows = (c + r - 1) / r * r;
    if (G * r <= kAccumulators && rows < best_rows) best = r, best_rows = rows;
  }
  return best;
}

template <int G>
void ConvKernelGradTap(const float* in, size_t c, const Vec* dy, size_t vectors, size_t q_end, Vec* dw) {
  const int block = tap_block(c, G);
  for (size_t ci = 0; ci < c; ci += block) {
    const size_t rows = std::min<size_t>(block, c - ci);
    Vec* out = dw + ci * vectors;
    switch (block) {
#define DDPM_JAX_TAP_BLOCK(R) \
  case R: if constexpr (G * R <= kAccumulators) ConvKernelGradTapRows<G, R>(in + ci, c, dy, vectors, q_end, rows, out); break;
      DDPM_JAX_TAP_BLOCK(24) DDPM_JAX_TAP_BLOCK(20) DDPM_JAX_TAP_BLOCK(16) DDPM_JAX_TAP_BLOCK(12)
      DDPM_JAX_TAP_BLOCK(10) DDPM_JAX_TAP_BLOCK(8) DDPM_JAX_TAP_BLOCK(6) DDPM_JAX_TAP_BLOCK(4)
      DDPM_JAX_TAP_BLOCK(3) DDPM_JAX_TAP_BLOCK(2)
#undef DDPM_JAX_TAP_BLOCK
    }
  }
}

// The planar form of the kernel's gradient, for outputs that fill vectors poorly: input and dy in one
// plane per channel (dy zero at the dropped columns), a vector holds kLanes consecutive pixels q,
// and a tile of R rows (tap, ci) x OB output channels sums x_plane[q + offset] * dy_plane[q] over
// an image's pixels in R x OB accumulators, every lane used; per kLanes pixels it loads R + OB
// vectors for R x OB multiply-adds. The lanes are summed once per chunk of images.
// R: as many rows as fit beside the accumulators and the loaded vectors.
constexpr int planar_grad_rows(int ob) { return (kVectorRegisters - 1 - ob) / (ob + 1); }
constexpr int kMaxPlanarGradBlock = 5;

template <int R, int OB>
void ConvKernelGradPlanarTile(const float* __restrict planes, const int* __restrict offsets,
                              const float* __restrict dy, size_t dy_stride, size_t q_end, Vec* __restrict sums,
                              size_t sums_row) {
  Vec acc[R][OB] = {};
  const float* x[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) x[r] = planes + offsets[r];
  for (size_t q = 0; q < q_end; q += kLanes) {
    Vec in[R], g[OB];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      std::memcpy(&in[r], x[r] + q, sizeof(Vec));
      in_register(in[r]);
    }
#pragma GCC unroll 8
    for (int j = 0; j < OB; ++j) {
      std::memcpy(&g[j], dy + j * dy_stride + q, sizeof(Vec));
      in_register(g[j]);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < OB; ++j) acc[r][j] += in[r] * g[j];
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < OB; ++j) sums[r * sums_row + j] += acc[r][j];
}

// Output channels per tile for o channels and `rows` rows: the least time, padding included, a
// tile's pixel vector taking the longer of its R x OB multiply-adds and its loads (one vector per
// cycle, the R unaligned ones two: each spans two cache lines). On AVX-512, 28x28 10 -> 10: tiles
// of 4 rows x 5 channels; 14x14 20 -> 20: 5 x 4; 10 -> 1: 15 x 1.
int planar_grad_block(size_t o, size_t rows) {
  int best = 1;
  size_t best_cost = ~size_t{0};
  for (int ob = 1; ob <= kMaxPlanarGradBlock; ++ob) {
    const size_t r = planar_grad_rows(ob);
    if (r == 0) continue;
    const size_t cost = (o + ob - 1) / ob * ((rows + r - 1) / r) * std::max(r * ob, 2 * r + ob);
    if (cost < best_cost) best = ob, best_cost = cost;
  }
  return best;
}

void ConvKernelGradPlanar(ffi::ThreadPool& pool, const ConvGeometry& geo, const float* x_data, const float* dy_data,
                          float* dw_data) {
  const size_t c = geo.c, o = geo.o, k = geo.k, rows = k * k * c;
  const size_t stride = (geo.height + 2 * geo.pad) * geo.padded_width + kPlanarSlack;
  const size_t dy_stride = (geo.q_end + kLanes - 1) / kLanes * kLanes;
  const int ob = planar_grad_block(o, rows), r_block = planar_grad_rows(ob);
  const size_t padded_o = (o + ob - 1) / ob * ob, padded_rows = (rows + r_block - 1) / r_block * r_block;
  // Row (tap, ci)'s offset into the planes from pixel q; the padding rows' sums are dropped.
  std::vector<int> offsets(padded_rows, 0);
  for (size_t r = 0; r < rows; ++r) {
    const size_t tap = r / c;
    offsets[r] = static_cast<int>((r % c) * stride + (tap / k) * geo.padded_width + tap % k);
  }
  const size_t threads = std::max<int64_t>(1, pool.num_threads());
  const size_t chunk = std::max<size_t>(1, geo.batch / (4 * threads)), chunks = (geo.batch + chunk - 1) / chunk;
  std::vector<Vec> partials(chunks * padded_rows * padded_o);  // zeroed
  const int* offset_data = offsets.data();
  Vec* partial_data = partials.data();
  parallel_for(pool, geo.batch, chunk, [=, &geo](size_t begin, size_t end) {
    // Planes zeroed once per chunk: borders, dropped columns, slack and dy's padding planes stay zero.
    std::vector<float> planes(c * stride, 0.0f);
    std::vector<Vec> dy_vectors(padded_o * dy_stride / kLanes);  // zeroed; aligned, as the loads of dy
    float* dy_planes = reinterpret_cast<float*>(dy_vectors.data());
    Vec* sums = partial_data + begin / chunk * padded_rows * padded_o;
    for (size_t b = begin; b < end; ++b) {
      for (size_t row = 0; row < geo.height; ++row)
        to_planes(x_data + (b * geo.height + row) * geo.width * c, geo.width, c,
                  planes.data() + (row + geo.pad) * geo.padded_width + geo.pad, stride);
      for (size_t y = 0; y < geo.out_height; ++y)
        to_planes(dy_data + (b * geo.out_height + y) * geo.out_width * o, geo.out_width, o,
                  dy_planes + y * geo.padded_width, dy_stride);
      for (size_t first = 0; first < padded_o; first += ob)
        for (size_t r = 0; r < padded_rows; r += r_block) {
          const float* dy = dy_planes + first * dy_stride;
          Vec* out = sums + r * padded_o + first;
          switch (ob) {
#define DDPM_JAX_GRAD_BLOCK(OB)                                                                                 \
  case OB:                                                                                                     \
    if constexpr (planar_grad_rows(OB) > 0)                                                                    \
      ConvKernelGradPlanarTile<planar_grad_rows(OB), OB>(planes.data(), offset_data + r, dy, dy_stride,        \
                                                         geo.q_end, out, padded_o);                            \
    break;
            DDPM_JAX_GRAD_BLOCK(1) DDPM_JAX_GRAD_BLOCK(2) DDPM_JAX_GRAD_BLOCK(3) DDPM_JAX_GRAD_BLOCK(4)
            DDPM_JAX_GRAD_BLOCK(5)
#undef DDPM_JAX_GRAD_BLOCK
          }
        }
    }
  });
  for (size_t chunk_index = 0; chunk_index < chunks; ++chunk_index) {
    const Vec* sums = partial_data + chunk_index * padded_rows * padded_o;
    for (size_t r = 0; r < rows; ++r)
      for (size_t co = 0; co < o; ++co) {
        float total = 0.0f;
        for (int l = 0; l < kLanes; ++l) total += sums[r * padded_o + co][l];
        dw_data[r * o + co] += total;
      }
  }
}

// The kernel's gradient of Conv: dw[ky, kx, ci, co] = sum over images and output pixels q of
// x_padded[q + ky (W + 2p) + kx, ci] * dy[q, co], with dy laid out as Conv's q (zero at the
// dropped columns). Blocks of R rows (tap, ci) x G vectors of output channels stay in registers
// over an image's pixels; each chunk of images sums into its own partial kernel (added up at the
// end), as LayerNormGrad.
ffi::Error ConvKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, int64_t size,
                          int64_t padding, ffi::ResultBuffer<ffi::F32> dw) {
  const auto dims = x.dimensions();
  const auto ddims = dy.dimensions();
  if (dims.size() != 4 || ddims.size() != 4 || padding < 0 || padding >= size || dims[1] + 2 * padding < size ||
      dims[2] + 2 * padding < size || ddims[0] != dims[0] || ddims[1] != dims[1] + 2 * padding + 1 - size ||
      ddims[2] != dims[2] + 2 * padding + 1 - size)
    return ffi::Error::InvalidArgument("conv_kernel_grad: expects x (B, H, W, C) and dy, the convolution's output");
  const ConvGeometry geo(dims[0], dims[1], dims[2], dims[3], ddims[3], size, padding);
  const size_t c = geo.c, o = geo.o, vectors = geo.vectors, rows = geo.k * geo.k * c;
  float* dw_data = dw->typed_data();
  std::fill(dw_data, dw_data + rows * o, 0.0f);
  if (geo.batch * geo.out_height * geo.out_width * c * o == 0) return ffi::Error::Success();
  if (use_planar_grad(geo)) {
    ConvKernelGradPlanar(pool, geo, x.typed_data(), dy.typed_data(), dw_data);
    return ffi::Error::Success();
  }
  // Each row's offset into the padded image from pixel q's channels (q c): tap (ky, kx) -> the
  // pixel q + ky (W + 2p) + kx, channel ci. A block's rows past the last read offset 0.
  std::vector<int> offsets(rows + kAccumulators, 0);
  for (size_t r = 0; r < rows; ++r) {
    const size_t tap = r / c;
    offsets[r] = static_cast<int>(((tap / geo.k) * geo.padded_width + tap % geo.k) * c + r % c);
  }
  const size_t threads = std::max<int64_t>(1, pool.num_threads());
  const size_t chunk = std::max<size_t>(1, geo.batch / (4 * threads)), chunks = (geo.batch + chunk - 1) / chunk;
  // Per chunk, rows padded by a block: the last block's rows past the last are computed, not used.
  const size_t padded_rows = rows + kAccumulators;
  std::vector<Vec> partials(chunks * padded_rows * vectors);  // zeroed
  const float* x_data = x.typed_data();
  const float* dy_data = dy.typed_data();
  const int* offset_data = offsets.data();
  Vec* partial_data = partials.data();
  parallel_for(pool, geo.batch, chunk, [=](size_t begin, size_t end) {
    std::vector<float> image(geo.buffer_pixels() * c, 0.0f);
    std::vector<Vec> grad(geo.q_end * vectors);  // zeroed
    Vec* partial = partial_data + begin / chunk * padded_rows * vectors;
    for (size_t b = begin; b < end; ++b) {
      geo.fill(image.data(), x_data, b);
      // dy at the q of its pixels, channels padded to whole vectors with zeros, which add
      // nothing; the dropped columns' vectors stay as allocated, zero.
      const float* dy_image = dy_data + b * geo.out_height * geo.out_width * o;
      for (size_t y = 0; y < geo.out_height; ++y)
        for (size_t xx = 0; xx < geo.out_width; ++xx) {
          const float* src = dy_image + (y * geo.out_width + xx) * o;
          Vec* dst = grad.data() + (y * geo.padded_width + xx) * vectors;
          for (size_t j = 0; j < vectors; ++j) dst[j] = load_first(src + j * kLanes, std::min<size_t>(kLanes, o - j * kLanes));
        }
      for (size_t g = 0; g < geo.groups; ++g) {
        const Vec* dy_group = grad.data() + g * kMaxGroup;
        if (c >= 4) {  // per tap
          for (size_t tap = 0; tap < geo.k * geo.k; ++tap) {
            const float* in = image.data() + offset_data[tap * c];
            Vec* out = partial + tap * c * vectors + g * kMaxGroup;
            switch (geo.group_size(g)) {
              case 1: ConvKernelGradTap<1>(in, c, dy_group, vectors, geo.q_end, out); break;
              case 2: ConvKernelGradTap<2>(in, c, dy_group, vectors, geo.q_end, out); break;
              case 3: ConvKernelGradTap<3>(in, c, dy_group, vectors, geo.q_end, out); break;
              default: ConvKernelGradTap<4>(in, c, dy_group, vectors, geo.q_end, out); break;
            }
          }
          continue;
        }
        for (size_t r = 0; r < rows;) {
          Vec* out = partial + r * vectors + g * kMaxGroup;
          const int* block = offset_data + r;
          switch (geo.group_size(g)) {
            case 1: ConvKernelGradRows<1, kAccumulators / 1>(image.data(), c, block, dy_group, vectors, geo.q_end, out); r += kAccumulators / 1; break;
            case 2: ConvKernelGradRows<2, kAccumulators / 2>(image.data(), c, block, dy_group, vectors, geo.q_end, out); r += kAccumulators / 2; break;
            case 3: ConvKernelGradRows<3, kAccumulators / 3>(image.data(), c, block, dy_group, vectors, geo.q_end, out); r += kAccumulators / 3; break;
            default: ConvKernelGradRows<4, kAccumulators / 4>(image.data(), c, block, dy_group, vectors, geo.q_end, out); r += kAccumulators / 4; break;
          }
        }
      }
    }
  });
  for (size_t chunk_index = 0; chunk_index < chunks; ++chunk_index) {
    const float* partial = reinterpret_cast<const float*>(partial_data + chunk_index * padded_rows * vectors);
    for (size_t r = 0; r < rows; ++r)
      for (size_t co = 0; co < o; ++co) dw_data[r * o + co] += partial[r * vectors * kLanes + co];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DdpmJaxSilu, Silu,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DdpmJaxSiluAndSigmoid, SiluAndSigmoid,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DdpmJaxBiasSilu, BiasSiluEntry,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DdpmJaxBiasSiluAndSigmoid, BiasSiluAndSigmoidEntry,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DdpmJaxLayerNorm, LayerNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DdpmJaxLayerNormGrad, LayerNormGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DdpmJaxSiluGrad, SiluGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DdpmJaxConv, Conv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("padding")
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DdpmJaxConvKernelGrad, ConvKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("size")
                                  .Attr<int64_t>("padding")
                                  .Ret<ffi::Buffer<ffi::F32>>());
