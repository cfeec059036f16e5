// SiLU and the article's LayerNorm, forward and backward, for XLA:CPU through the XLA FFI
// (ddpm_jax/models/cpu_kernels.py builds and registers them). XLA:CPU's loop emitter vectorises
// an elementwise fusion that holds a broadcast (a bias, a constant, a per-example mean) along its
// innermost dimension only: a few lanes for this project's 10- and 20-channel activations. These
// loops run over flat buffers; gcc -O3 -march=native vectorises every one of them.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

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

// y = x * sigmoid(x).
ffi::Error Silu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  const float* __restrict in = x.typed_data();
  float* __restrict out = y->typed_data();
  parallel_for(pool, x.element_count(), kChunk, [in, out](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) out[i] = in[i] / (1.0f + exp_approx(-in[i]));
  });
  return ffi::Error::Success();
}

// y = x * sigmoid(x) and sigmoid(x), which the gradient needs: dy/dx = s + y (1 - s).
ffi::Error SiluAndSigmoid(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                          ffi::ResultBuffer<ffi::F32> s) {
  const float* __restrict in = x.typed_data();
  float* __restrict out = y->typed_data();
  float* __restrict sig = s->typed_data();
  parallel_for(pool, x.element_count(), kChunk, [in, out, sig](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) {
      const float sigmoid = 1.0f / (1.0f + exp_approx(-in[i]));
      sig[i] = sigmoid;
      out[i] = in[i] * sigmoid;
    }
  });
  return ffi::Error::Success();
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

// Sum of n floats in 16 running partial sums, so the loop vectorises without reassociation flags.
inline float sum16(const float* __restrict v, size_t n) {
  float lanes[16] = {};
  size_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += v[i + l];
  float total = 0.0f;
  for (; i < n; ++i) total += v[i];
  for (int l = 0; l < 16; ++l) total += lanes[l];
  return total;
}

// Sum of (v - c)^2 over n floats, the same way.
inline float sum16_sq(const float* __restrict v, float c, size_t n) {
  float lanes[16] = {};
  size_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += (v[i + l] - c) * (v[i + l] - c);
  float total = 0.0f;
  for (; i < n; ++i) total += (v[i] - c) * (v[i] - c);
  for (int l = 0; l < 16; ++l) total += lanes[l];
  return total;
}

// Layer normalisation of each row of x (rows of d = scale's size elements) with an elementwise
// scale and bias, as torch.nn.LayerNorm over (C, H, W): exact two-pass variance, biased.
// Also returns each row's mean and 1 / sqrt(var + eps), for the gradient.
ffi::Error LayerNorm(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias, float eps,
                     ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd) {
  const size_t d = scale.element_count(), rows = d ? x.element_count() / d : 0;
  const float* __restrict w = scale.typed_data();
  const float* __restrict b = bias.typed_data();
  for (size_t r = 0; r < rows; ++r) {
    const float* __restrict in = x.typed_data() + r * d;
    float* __restrict out = y->typed_data() + r * d;
    const float m = sum16(in, d) / d;
    const float s = 1.0f / std::sqrt(sum16_sq(in, m, d) / d + eps);
    for (size_t i = 0; i < d; ++i) out[i] = (in[i] - m) * s * w[i] + b[i];
    mean->typed_data()[r] = m;
    rstd->typed_data()[r] = s;
  }
  return ffi::Error::Success();
}

// The gradient of LayerNorm: with xh = (x - mean) * rstd and g = dy * scale,
// dx = rstd * (g - mean(g) - xh * mean(g * xh)); dscale = sum over rows of dy * xh; dbias = sum of dy.
ffi::Error LayerNormGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                         ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                         ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dbias) {
  const size_t d = scale.element_count(), rows = d ? x.element_count() / d : 0;
  const float* __restrict w = scale.typed_data();
  float* __restrict dw = dscale->typed_data();
  float* __restrict db = dbias->typed_data();
  for (size_t i = 0; i < d; ++i) dw[i] = db[i] = 0.0f;
  for (size_t r = 0; r < rows; ++r) {
    const float* __restrict in = x.typed_data() + r * d;
    const float* __restrict g = dy.typed_data() + r * d;
    float* __restrict out = dx->typed_data() + r * d;
    const float m = mean.typed_data()[r], s = rstd.typed_data()[r];
    float lanes_g[16] = {}, lanes_gx[16] = {};
    size_t i = 0;
    for (; i + 16 <= d; i += 16)
      for (int l = 0; l < 16; ++l) {
        const float xh = (in[i + l] - m) * s, gw = g[i + l] * w[i + l];
        lanes_g[l] += gw;
        lanes_gx[l] += gw * xh;
      }
    float sum_g = 0.0f, sum_gx = 0.0f;
    for (; i < d; ++i) {
      const float xh = (in[i] - m) * s, gw = g[i] * w[i];
      sum_g += gw;
      sum_gx += gw * xh;
    }
    for (int l = 0; l < 16; ++l) sum_g += lanes_g[l], sum_gx += lanes_gx[l];
    const float mean_g = sum_g / d, mean_gx = sum_gx / d;
    for (i = 0; i < d; ++i) {
      const float xh = (in[i] - m) * s;
      out[i] = s * (g[i] * w[i] - mean_g - xh * mean_gx);
      dw[i] += g[i] * xh;
      db[i] += g[i];
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
XLA_FFI_DEFINE_HANDLER_SYMBOL(DdpmJaxLayerNorm, LayerNorm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DdpmJaxLayerNormGrad, LayerNormGrad,
                              ffi::Ffi::Bind()
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
