// Helpers shared by the native CPU kernels (cpu_paged_decode.cpp, cpu_paged_extend.cpp,
// runtime/models/cpu_decoder_ops.cpp): bfloat16 <-> float32 conversions and a vectorisable exp.
// cpu_kernels.py builds every kernel with this folder on the include path and hashes this file into the
// build cache's key, so a change here rebuilds them all.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace radixlm_cpu {

inline float load(float x) { return x; }
inline float load(uint16_t x) {  // bfloat16 bits -> float32 (exact)
  const uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store(float x, float* p) { *p = x; }
inline void store(float x, uint16_t* p) {  // float32 -> bfloat16, round to nearest even (as torch does)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  *p = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : uint16_t(r);  // NaN stays NaN; no branch
}

// exp(x) for x <= 0 in plain arithmetic, so the loops over it vectorise (libm's expf is a call per
// element): 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, p the degree-6 Taylor polynomial (relative
// error below 2e-7, under float32's own rounding of a softmax sum).
inline float exp_nonpos(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;  // ln2 split in two
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {  // bfloat16 -> float32: the 16 bits become each lane's high half
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

}  // namespace radixlm_cpu
