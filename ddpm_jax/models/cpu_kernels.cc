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
