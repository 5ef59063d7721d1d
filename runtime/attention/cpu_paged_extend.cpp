// Paged causal extend attention for the CPU: several new query tokens per request, keys and values
// read in place from the KV pool through the request's row of req_to_token.
//
// Built and loaded like cpu_paged_decode.cpp (see cpu_kernels.py). Needs AVX-512F (the Python side only
// loads it when the CPU has it), a head size of 64 or 128, and a query-head group that divides R = 16.
//
// New token i of request b sits at position prefix[b] + i and sees the slots begin .. prefix[b] + i of its
// row (begin = 0: its whole context; begin > 0: the suffix after a prefix that a cascade attends
// separately, for which the kernel also writes each row's log-sum-exp so the two parts can be merged).
// First, each request's keys are read from the pool once and packed in blocks of 16 keys, as float32: K
// transposed ([D][16]: one vector holds 16 keys' d-th elements), V as rows. Then one OpenMP task per
// (request, block of QB query positions); inside, per KV head, the R = QB * G query rows that read it (QB
// positions x the G query heads of the KV head) go over the key blocks with an online softmax:
//   * scores: each row's scores for a block are one accumulator (R accumulators, a broadcast query
//     element and one FMA per row and d), so the products run at the FMA units' rate instead of a
//     horizontal sum per dot product;
//   * softmax: each row's 16 scores are one vector (max, exp), the causal mask a lane mask that only
//     the diagonal blocks need; the 16 rows' rescale factors are one vector exp, and each row's sum
//     stays a vector of lane sums until the end (one horizontal add per row, not one per block);
//   * values: each pair of rows keeps its D accumulators in registers while the block's 16 V rows
//     stream past.
// Packing once per call matters: re-packing the key blocks in every task cost as much as the products
// (a 2k-token step: 11.5 ms per layer with per-task packing, 7.5 ms packed once).
// All arithmetic is float32 whatever the storage (float32 or bfloat16).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <immintrin.h>

#include <memory>

#include "cpu_common.h"

namespace {

using namespace radixlm_cpu;

constexpr int64_t KB = 16;  // keys per block: one AVX-512 vector of float32
constexpr int64_t R = 16;   // query rows per task and KV head (QB positions x G heads)

// Packing buffers reused across calls: a fresh std::vector per call was zero-filled on one thread and
// page-faulted in again every time, which cost more than a tenth of a 2k-token step (interleaved A/B of
// the kernel, 2 threads: a 2k-token step of 7 prompts 10.7 -> 8.0 ms, 16 prompts of 64 2.2 -> 1.4 ms, one
// prompt of 2,048 38 -> 32 ms). One per calling thread, kept up to KEEP_FLOATS (64 MB); a larger call
// gets a buffer of its own, freed when it returns, so one long prompt does not pin its packing forever.
constexpr size_t KEEP_FLOATS = size_t(16) << 20;

struct Scratch {
  std::unique_ptr<float[]> kept;
  size_t kept_n = 0;
  // n floats, uninitialised (the packing writes every element); above KEEP_FLOATS they live in `own`.
  float* get(size_t n, std::unique_ptr<float[]>& own) {
    if (n > KEEP_FLOATS) {
      own.reset(new float[n]);
      return own.get();
    }
    if (n > kept_n) {
      kept.reset(new float[n]);
      kept_n = n;
    }
    return kept.get();
  }
};

// exp(x) for x <= 0, 16 lanes: 2^n * p(r), x = n ln2 + r, p the degree-6 Taylor polynomial (relative
// error below 2e-7), as exp_nonpos in cpu_common.h.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// q, out [T, Hq, D]; k, v [slots, Hkv, D]; req_to_token [rows, stride]; per request b of B: rows[b] (its
// row), q_start[b] (its first token in q), prefix[b] (cached slots before its new tokens), n_new[b];
// begin <= every prefix[b]: the first slot read; lse [T, Hq] or null: log-sum-exp of each written row's
// scaled scores.
template <typename T, int64_t D>
void causal_extend(const T* q, const T* k, const T* v, const int64_t* req_to_token, int64_t stride,
                   const int64_t* rows, const int64_t* q_start, const int64_t* prefix, const int64_t* n_new,
                   int64_t begin, T* out, float* lse, int64_t B, int64_t Hq, int64_t Hkv, float scale) {
  constexpr int64_t DV = D / 16;  // vectors per head row
  const int64_t G = Hq / Hkv;
  const int64_t QB = R / G;  // query positions per task (the caller guarantees G divides R)
  const int64_t row_len = Hkv * D;
  // Key blocks of each request (its first block's index in the packed buffers), and the tasks.
  std::vector<int64_t> blk0(B + 1, 0), task_b, task_i, pack_b, pack_j;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t nblk = (prefix[b] - begin + n_new[b] + KB - 1) / KB;
    blk0[b + 1] = blk0[b] + nblk;
    for (int64_t j = 0; j < nblk; ++j) {
      pack_b.push_back(b);
      pack_j.push_back(j);
    }
    for (int64_t i = 0; i < n_new[b]; i += QB) {
      task_b.push_back(b);
      task_i.push_back(i);
    }
  }
  // Packed once per call, read by every task of the request: K transposed per block [blk][Hkv][D][KB]
  // (one vector = 16 keys' d-th elements), V per block [blk][Hkv][KB][D]; float32, zeros past the end.
  thread_local Scratch k_scratch, v_scratch;
  std::unique_ptr<float[]> k_own, v_own;
  float* const kp = k_scratch.get(size_t(blk0[B] * Hkv * D * KB), k_own);
  float* const vp = v_scratch.get(size_t(blk0[B] * Hkv * KB * D), v_own);
  const int64_t npack = int64_t(pack_b.size()), ntasks = int64_t(task_b.size());
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < npack; ++t) {
      const int64_t b = pack_b[t], j0 = pack_j[t] * KB, len = prefix[b] - begin + n_new[b];
      const int64_t* slot = req_to_token + rows[b] * stride + begin;
      float* kb = kp + (blk0[b] + pack_j[t]) * Hkv * D * KB;
      float* vb = vp + (blk0[b] + pack_j[t]) * Hkv * KB * D;
      for (int64_t j = 0; j < KB; ++j) {
        if (j0 + j >= len) {
          for (int64_t h = 0; h < Hkv; ++h) {
            for (int64_t d = 0; d < D; ++d) kb[(h * D + d) * KB + j] = 0.f;
            for (int64_t d = 0; d < D; ++d) vb[(h * KB + j) * D + d] = 0.f;
          }
          continue;
        }
        const T* kr = k + slot[j0 + j] * row_len;
        const T* vr = v + slot[j0 + j] * row_len;
        for (int64_t h = 0; h < Hkv; ++h) {
          for (int64_t d = 0; d < D; ++d) kb[(h * D + d) * KB + j] = load(kr[h * D + d]);
          for (int64_t dv = 0; dv < DV; ++dv) _mm512_storeu_ps(vb + (h * KB + j) * D + dv * 16, load16(vr + h * D + dv * 16));
        }
      }
    }
    alignas(64) float qs[R][D];   // the rows' scaled queries
    alignas(64) float acc[R][D];  // output accumulators
    alignas(64) float pr[R][KB];  // the block's probabilities per row
    alignas(64) float lv[R][KB];  // each row's softmax sum, per lane (summed once, at the end)
    float m[R];
    int64_t pos[R];  // each row's last visible key, counted from begin
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; ++t) {
      const int64_t b = task_b[t], i0 = task_i[t];
      const int64_t nq = std::min(QB, n_new[b] - i0);  // positions in this block (the last may be short)
      const int64_t last = prefix[b] - begin + i0 + nq - 1;  // the block's last visible key
      for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
        for (int64_t r = 0; r < R; ++r) {  // row r: position r / G of the block, query head kvh*G + r % G
          const int64_t qi = std::min(r / G, nq - 1);  // a short block repeats its last position
          pos[r] = prefix[b] - begin + i0 + qi;
          const T* src = q + ((q_start[b] + i0 + qi) * Hq + kvh * G + r % G) * D;
          for (int64_t d = 0; d < D; ++d) qs[r][d] = load(src[d]) * scale;
          for (int64_t d = 0; d < D; ++d) acc[r][d] = 0.f;
          m[r] = -INFINITY;
          _mm512_store_ps(lv[r], _mm512_setzero_ps());
        }
        for (int64_t j0 = 0; j0 <= last; j0 += KB) {
          const float* kt = kp + ((blk0[b] + j0 / KB) * Hkv + kvh) * D * KB;
          const float* vb = vp + ((blk0[b] + j0 / KB) * Hkv + kvh) * KB * D;
          const int64_t n = std::min(KB, last + 1 - j0);
          __m512 sc[R];
          for (int64_t r = 0; r < R; ++r) sc[r] = _mm512_setzero_ps();
          for (int64_t d = 0; d < D; ++d) {
            const __m512 kd = _mm512_loadu_ps(kt + d * KB);
            for (int64_t r = 0; r < R; ++r) sc[r] = _mm512_fmadd_ps(_mm512_set1_ps(qs[r][d]), kd, sc[r]);
          }
          const __m512i lane = _mm512_add_epi32(_mm512_set1_epi32(int32_t(j0)),
                                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
          // Online softmax over the block's visible keys: every row's new max first, then one vector exp
          // for the 16 rows' rescale factors (a libm call per row and block cost about a tenth of the
          // kernel); the first block's factor is exp(-87), as good as 0 against l = 0 and acc = 0.
          __mmask16 ok[R];
          alignas(64) float mxs[R], alphas[R];
          for (int64_t r = 0; r < R; ++r) {
            ok[r] = _mm512_cmple_epi32_mask(lane, _mm512_set1_epi32(int32_t(pos[r])));
            mxs[r] = std::max(m[r], _mm512_mask_reduce_max_ps(ok[r], sc[r]));
          }
          _mm512_store_ps(alphas, exp16(_mm512_sub_ps(_mm512_loadu_ps(m), _mm512_load_ps(mxs))));
          for (int64_t r = 0; r < R; ++r) {
            const float mx = mxs[r], alpha = alphas[r];
            const __m512 p = _mm512_maskz_mov_ps(ok[r], exp16(_mm512_sub_ps(sc[r], _mm512_set1_ps(mx))));
            _mm512_store_ps(lv[r], _mm512_fmadd_ps(_mm512_load_ps(lv[r]), _mm512_set1_ps(alpha), p));
            m[r] = mx;
            _mm512_store_ps(pr[r], p);
            if (alpha != 1.f) {
              const __m512 a = _mm512_set1_ps(alpha);
              for (int64_t dv = 0; dv < DV; ++dv)
                _mm512_store_ps(&acc[r][dv * 16], _mm512_mul_ps(a, _mm512_load_ps(&acc[r][dv * 16])));
            }
          }
          for (int64_t r = 0; r < R; r += 2) {  // acc[r] += sum_j p[r][j] v_j, two rows at a time
            __m512 a0[DV], a1[DV];
            for (int64_t dv = 0; dv < DV; ++dv) {
              a0[dv] = _mm512_load_ps(&acc[r][dv * 16]);
              a1[dv] = _mm512_load_ps(&acc[r + 1][dv * 16]);
            }
            for (int64_t j = 0; j < n; ++j) {
              const __m512 p0 = _mm512_set1_ps(pr[r][j]), p1 = _mm512_set1_ps(pr[r + 1][j]);
              for (int64_t dv = 0; dv < DV; ++dv) {
                const __m512 vv = _mm512_loadu_ps(vb + j * D + dv * 16);
                a0[dv] = _mm512_fmadd_ps(p0, vv, a0[dv]);
                a1[dv] = _mm512_fmadd_ps(p1, vv, a1[dv]);
              }
            }
            for (int64_t dv = 0; dv < DV; ++dv) {
              _mm512_store_ps(&acc[r][dv * 16], a0[dv]);
              _mm512_store_ps(&acc[r + 1][dv * 16], a1[dv]);
            }
          }
        }
        for (int64_t r = 0; r < R; ++r) {
          if (r / G >= nq) continue;  // a repeated row of a short block
          const float l = _mm512_reduce_add_ps(_mm512_load_ps(lv[r]));
          const float inv = 1.f / l;  // every position sees at least its own key
          const int64_t row = (q_start[b] + i0 + r / G) * Hq + kvh * G + r % G;
          T* dst = out + row * D;
          for (int64_t d = 0; d < D; ++d) store(acc[r][d] * inv, dst + d);
          if (lse) lse[row] = m[r] + std::log(l);
        }
      }
    }
  }
}

template <typename T>
int dispatch(const T* q, const T* k, const T* v, const int64_t* req_to_token, int64_t stride, const int64_t* rows,
             const int64_t* q_start, const int64_t* prefix, const int64_t* n_new, int64_t begin, T* out, float* lse,
             int64_t B, int64_t Hq, int64_t Hkv, int64_t D, float scale) {
  if (Hq % Hkv || R % (Hq / Hkv) || begin < 0) return 1;
  for (int64_t b = 0; b < B; ++b)
    if (prefix[b] < begin) return 1;
  if (D == 64)
    causal_extend<T, 64>(q, k, v, req_to_token, stride, rows, q_start, prefix, n_new, begin, out, lse, B, Hq, Hkv,
                         scale);
  else if (D == 128)
    causal_extend<T, 128>(q, k, v, req_to_token, stride, rows, q_start, prefix, n_new, begin, out, lse, B, Hq, Hkv,
                          scale);
  else
    return 1;
  return 0;
}

}  // namespace

extern "C" {

int radixlm_causal_extend_f32(const float* q, const float* k, const float* v, const int64_t* req_to_token,
                              int64_t stride, const int64_t* rows, const int64_t* q_start, const int64_t* prefix,
                              const int64_t* n_new, int64_t begin, float* out, float* lse, int64_t B, int64_t Hq,
                              int64_t Hkv, int64_t D, float scale) {
  return dispatch<float>(q, k, v, req_to_token, stride, rows, q_start, prefix, n_new, begin, out, lse, B, Hq, Hkv, D,
                         scale);
}

int radixlm_causal_extend_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, const int64_t* req_to_token,
                               int64_t stride, const int64_t* rows, const int64_t* q_start, const int64_t* prefix,
                               const int64_t* n_new, int64_t begin, uint16_t* out, float* lse, int64_t B, int64_t Hq,
                               int64_t Hkv, int64_t D, float scale) {
  return dispatch<uint16_t>(q, k, v, req_to_token, stride, rows, q_start, prefix, n_new, begin, out, lse, B, Hq, Hkv,
                            D, scale);
}

}  // extern "C"
