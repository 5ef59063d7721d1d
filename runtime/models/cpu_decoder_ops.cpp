// The decoder's elementwise ops for the CPU, one pass each: RMSNorm, rotary embedding, SiLU-and-multiply.
//
// Built and loaded like the attention kernels (runtime/attention/cpu_kernels.py: g++ -O3 -march=native
// -fopenmp, called through ctypes; see cpu_decoder_ops.py). They exist for decode batches: there each
// op's tensors are a few kilobytes, and torch's eager versions cost several dispatched passes per op
// (RMSNorm: cast, square, mean, rsqrt, two products) where one loop takes a few microseconds. Plain
// loops that the compiler vectorises (no intrinsics, so no instruction-set requirement), float32 and
// bfloat16 storage, float32 arithmetic.
//
// Rounding: each loop rounds to the storage type wherever torch's eager ops do (after every bfloat16
// op), so the rotary embedding is bit-identical to the eager version (the same products and sums, no
// contraction into FMAs: hence fp-contract=off below); RMSNorm sums the squares in another order and
// SiLU's exp is a polynomial (relative error below 2e-7), so those two agree with eager to rounding.

#pragma GCC optimize("fp-contract=off")

#include "cpu_common.h"

namespace {

using namespace radixlm_cpu;

// Calls below PARALLEL_MIN elements stay on the calling thread (a parallel region's fork and join costs
// about what a decode batch's whole op does); larger ones split their rows over the OpenMP threads.
constexpr int64_t PARALLEL_MIN = int64_t(1) << 16;

template <typename E>
inline E st(float x) {  // x in the storage type
  E e;
  store(x, &e);
  return e;
}
template <typename E>
inline float rnd(float x) { return load(st<E>(x)); }  // x as stored in E (float32: unchanged)

// x [T, H] (row stride x_stride), w [H], out [T, H] contiguous: out = w * (x / sqrt(mean(x^2) + eps)),
// the normalised x rounded to the storage type before the gain, as transformers' RMSNorm does.
template <typename E>
void rms_norm(const E* x, int64_t x_stride, const E* w, E* out, int64_t T, int64_t H, float eps) {
#pragma omp parallel for if (T * H >= PARALLEL_MIN)
  for (int64_t t = 0; t < T; ++t) {
    const E* xr = x + t * x_stride;
    E* o = out + t * H;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t d = 0; d < H; ++d) ss += load(xr[d]) * load(xr[d]);
    const float r = 1.f / std::sqrt(ss / float(H) + eps);
#pragma omp simd
    for (int64_t d = 0; d < H; ++d) o[d] = st<E>(load(w[d]) * rnd<E>(load(xr[d]) * r));
  }
}

// x [T, Hh, D] (strides x_st, x_sh; the last dimension contiguous), cos, sin [T, D/2] (row stride
// cs_stride), out [T, Hh, D] contiguous; rotate-half layout: out = (x1 c - x2 s, x2 c + x1 s).
template <typename E>
void rope(const E* x, int64_t x_st, int64_t x_sh, const E* cos, const E* sin, int64_t cs_stride, E* out,
          int64_t T, int64_t Hh, int64_t D) {
  const int64_t half = D / 2;
#pragma omp parallel for if (T * Hh * D >= PARALLEL_MIN)
  for (int64_t t = 0; t < T; ++t) {
    const E* c = cos + t * cs_stride;
    const E* s = sin + t * cs_stride;
    for (int64_t h = 0; h < Hh; ++h) {
      const E* x1 = x + t * x_st + h * x_sh;
      const E* x2 = x1 + half;
      E* o = out + (t * Hh + h) * D;
#pragma omp simd
      for (int64_t d = 0; d < half; ++d) {
        const float a = rnd<E>(load(x1[d]) * load(c[d])), b = rnd<E>(load(x2[d]) * load(s[d]));
        o[d] = st<E>(a - b);
      }
#pragma omp simd
      for (int64_t d = 0; d < half; ++d) {
        const float a = rnd<E>(load(x2[d]) * load(c[d])), b = rnd<E>(load(x1[d]) * load(s[d]));
        o[half + d] = st<E>(a + b);
      }
    }
  }
}

// gate_up [T, 2I] (row stride gu_stride: the gate, then the up projection), out [T, I] contiguous:
// out = silu(gate) * up, silu(g) = g * sigmoid(g), sigmoid from exp(-|g|) so the exp never overflows.
template <typename E>
void silu_mul(const E* gate_up, int64_t gu_stride, E* out, int64_t T, int64_t I) {
#pragma omp parallel for if (T * I >= PARALLEL_MIN)
  for (int64_t t = 0; t < T; ++t) {
    const E* g = gate_up + t * gu_stride;
    const E* u = g + I;
    E* o = out + t * I;
#pragma omp simd
    for (int64_t i = 0; i < I; ++i) {
      const float gi = load(g[i]);
      const float e = exp_nonpos(-std::fabs(gi));
      const float sig = gi >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
      o[i] = st<E>(rnd<E>(gi * sig) * load(u[i]));
    }
  }
}

}  // namespace

extern "C" {

void radixlm_rms_norm_f32(const float* x, int64_t x_stride, const float* w, float* out, int64_t T, int64_t H,
                          float eps) {
  rms_norm(x, x_stride, w, out, T, H, eps);
}
void radixlm_rms_norm_bf16(const uint16_t* x, int64_t x_stride, const uint16_t* w, uint16_t* out, int64_t T,
                           int64_t H, float eps) {
  rms_norm(x, x_stride, w, out, T, H, eps);
}
void radixlm_rope_f32(const float* x, int64_t x_st, int64_t x_sh, const float* cos, const float* sin,
                      int64_t cs_stride, float* out, int64_t T, int64_t Hh, int64_t D) {
  rope(x, x_st, x_sh, cos, sin, cs_stride, out, T, Hh, D);
}
void radixlm_rope_bf16(const uint16_t* x, int64_t x_st, int64_t x_sh, const uint16_t* cos, const uint16_t* sin,
                       int64_t cs_stride, uint16_t* out, int64_t T, int64_t Hh, int64_t D) {
  rope(x, x_st, x_sh, cos, sin, cs_stride, out, T, Hh, D);
}
void radixlm_silu_mul_f32(const float* gate_up, int64_t gu_stride, float* out, int64_t T, int64_t I) {
  silu_mul(gate_up, gu_stride, out, T, I);
}
void radixlm_silu_mul_bf16(const uint16_t* gate_up, int64_t gu_stride, uint16_t* out, int64_t T, int64_t I) {
  silu_mul(gate_up, gu_stride, out, T, I);
}

}  // extern "C"
