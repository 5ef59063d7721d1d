// Paged decode attention for the CPU: one query token per request, keys and values read in place from
// the KV pool through the request's row of req_to_token (no gathered copy of the context).
//
// Built on first use by cpu_kernels.py (g++ -O3 -march=native -fopenmp) and called through ctypes
// (cpu_paged_decode.py), so it includes no torch headers and compiles in about a second. OpenMP is the
// same runtime torch loaded (libgomp.so.1 is matched by soname), so torch.set_num_threads governs it too.
//
// Per request (one OpenMP task each): every query head of the request against every KV slot of its
// context, in blocks of BLK keys with an online softmax (running max m, running sum l, accumulator
// rescaled when the max grows), all in float32 whatever the storage type. A slot's K (or V) for all KV
// heads is one contiguous run of Hkv * D elements, so a task reads each slot's row once, front to back,
// and prefetches the rows PF slots ahead (slots may be scattered over the pool).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_common.h"

namespace {

using namespace radixlm_cpu;

constexpr int64_t BLK = 32;  // keys per online-softmax block
constexpr int64_t PF = 4;    // slots prefetched ahead

// q . k over D elements, q pre-scaled. With AVX-512: 16 lanes per step and a shuffle tree at the end
// (_mm512_reduce_add_ps); left to itself, the compiler added the 16 lanes one after another (a chain of
// 16 dependent adds per dot product) and converted bfloat16 keys one element at a time. Measured with
// 64 requests of 320 keys, 2 threads: bfloat16 1.72-1.77 -> 0.86-1.02 ms, float32 within noise.
template <typename T>
inline float dot(const float* q, const T* k, int64_t D) {
  int64_t d = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(k + d), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
#pragma omp simd reduction(+ : s)
  for (int64_t e = d; e < D; ++e) s += q[e] * load(k[e]);
  return s;
}

inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o);
}

// q [B, Hq, D]; k, v [slots, Hkv, D]; req_to_token [rows, stride]; rows [B] (the request's row);
// seq_lens [B]: the request attends to keys begin .. seq_len - 1 of its row (begin > 0: the suffix after a
// prefix the caller attends to separately, as cascade attention does); out [B, Hq, D]; lse [B, Hq] float32
// (the log-sum-exp of the scaled scores, -inf for no keys) or null. Query head h reads KV head h / G.
// DC > 0 fixes the head size at compile time (the common 64 and 128): the per-key dot products and
// updates then unroll into a few full-width vector operations instead of a generic loop with a tail.
template <typename T, int64_t DC>
void paged_decode(const T* q, const T* k, const T* v, const int64_t* req_to_token, int64_t stride,
                  const int64_t* rows, const int64_t* seq_lens, int64_t begin, T* out, float* lse, int64_t B,
                  int64_t Hq, int64_t Hkv, int64_t D_, float scale) {
  const int64_t D = DC > 0 ? DC : D_;
  const int64_t G = Hq / Hkv;
  const int64_t row_len = Hkv * D;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) {
    // Per task: scaled queries and accumulators [Hq * D], block scores [Hq][BLK], running max and sum [Hq].
    std::vector<float> buf(2 * Hq * D + Hq * BLK + 2 * Hq);
    float* qs = buf.data();
    float* acc = qs + Hq * D;
    float* sc = acc + Hq * D;
    float* m = sc + Hq * BLK;
    float* l = m + Hq;
    for (int64_t i = 0; i < Hq * D; ++i) qs[i] = load(q[b * Hq * D + i]) * scale;
    for (int64_t h = 0; h < Hq; ++h) m[h] = -INFINITY;
    const int64_t len = seq_lens[b];
    const int64_t* slot = req_to_token + rows[b] * stride;
    for (int64_t j0 = begin; j0 < len; j0 += BLK) {
      const int64_t n = std::min(BLK, len - j0);
      for (int64_t j = 0; j < n; ++j) {  // scores sc[h * BLK + j] = q_h . k_j (q pre-scaled)
        if (j0 + j + PF < len) prefetch_row(k + slot[j0 + j + PF] * row_len, row_len * int64_t(sizeof(T)));
        const T* kj = k + slot[j0 + j] * row_len;
        for (int64_t kvh = 0; kvh < Hkv; ++kvh) {  // query heads kvh*G .. kvh*G+G-1 share this KV head
          const T* kh = kj + kvh * D;
          for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
            sc[h * BLK + j] = dot(qs + h * D, kh, D);
          }
        }
      }
      for (int64_t h = 0; h < Hq; ++h) {  // online softmax: fold the block into (m, l, acc)
        float* sh = sc + h * BLK;
        float mx = m[h];
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sh[j]);
        const float alpha = exp_nonpos(m[h] - mx);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; ++j) {
          sh[j] = exp_nonpos(sh[j] - mx);
          sum += sh[j];
        }
        l[h] = l[h] * alpha + sum;
        m[h] = mx;
        if (alpha != 1.f)
          for (int64_t d = 0; d < D; ++d) acc[h * D + d] *= alpha;
      }
      for (int64_t j = 0; j < n; ++j) {  // acc_h += p[h][j] * v_j
        if (j0 + j + PF < len) prefetch_row(v + slot[j0 + j + PF] * row_len, row_len * int64_t(sizeof(T)));
        const T* vj = v + slot[j0 + j] * row_len;
        for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
          const T* vh = vj + kvh * D;
          for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
            float* ah = acc + h * D;
            const float p = sc[h * BLK + j];
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ah[d] += p * load(vh[d]);
          }
        }
      }
    }
    for (int64_t h = 0; h < Hq; ++h) {
      const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;  // a context of 0 keys gives zeros, not NaN
      for (int64_t d = 0; d < D; ++d) store(acc[h * D + d] * inv, out + (b * Hq + h) * D + d);
      if (lse) lse[b * Hq + h] = l[h] > 0.f ? m[h] + std::log(l[h]) : -INFINITY;
    }
  }
}

template <typename T>
void dispatch(const T* q, const T* k, const T* v, const int64_t* req_to_token, int64_t stride, const int64_t* rows,
              const int64_t* seq_lens, int64_t begin, T* out, float* lse, int64_t B, int64_t Hq, int64_t Hkv,
              int64_t D, float scale) {
  if (D == 64)
    paged_decode<T, 64>(q, k, v, req_to_token, stride, rows, seq_lens, begin, out, lse, B, Hq, Hkv, D, scale);
  else if (D == 128)
    paged_decode<T, 128>(q, k, v, req_to_token, stride, rows, seq_lens, begin, out, lse, B, Hq, Hkv, D, scale);
  else
    paged_decode<T, 0>(q, k, v, req_to_token, stride, rows, seq_lens, begin, out, lse, B, Hq, Hkv, D, scale);
}

}  // namespace

extern "C" {

void radixlm_paged_decode_f32(const float* q, const float* k, const float* v, const int64_t* req_to_token,
                              int64_t stride, const int64_t* rows, const int64_t* seq_lens, int64_t begin,
                              float* out, float* lse, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, float scale) {
  dispatch<float>(q, k, v, req_to_token, stride, rows, seq_lens, begin, out, lse, B, Hq, Hkv, D, scale);
}

void radixlm_paged_decode_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v,
                               const int64_t* req_to_token, int64_t stride, const int64_t* rows,
                               const int64_t* seq_lens, int64_t begin, uint16_t* out, float* lse, int64_t B,
                               int64_t Hq, int64_t Hkv, int64_t D, float scale) {
  dispatch<uint16_t>(q, k, v, req_to_token, stride, rows, seq_lens, begin, out, lse, B, Hq, Hkv, D, scale);
}

}  // extern "C"
