// Helpers shared by our C++ CPU ops (engine/*.cc; engine/native.py builds each with this header, and rebuilds
// them when it changes).
#ifndef ENGINE_CPU_KERNELS_H_
#define ENGINE_CPU_KERNELS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/util/work_sharder.h"

namespace engine_kernels {

// The libraries are built without -march so that they run on any CPU TensorFlow supports; a function marked with
// this gets versions for the x86-64 levels v4 (AVX-512 F/BW/DQ/VL), v3 (AVX2, FMA) and baseline, and the loader
// picks one for the CPU at hand. v4 rather than AVX-512F alone: with BW and VL, GCC converts and packs bfloat16
// and selects with mask registers. On the AMX Xeon EngineSoftmaxDropout in bf16 took 6.8 ms instead of 9.2-9.9
// on [32, 12, 128, 128], its gradient 2.4-2.6 instead of 3.1-3.3, EngineKeyedDropout 3.0-3.3 instead of 3.9-4.4
// (bf16 and fp32); the same bits (-ffp-contract=off still: no FMA unless written out).
#define ENGINE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

inline uint16_t ToBfloat16(float f) {  // round to nearest even, as Eigen's bfloat16; NaN stays a quiet NaN
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t nan = (bits >> 16) | 0x40u;
  return static_cast<uint16_t>((bits & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

inline float FromBfloat16(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Row bodies written once for float and for bfloat16's bits (uint16_t): widen an element to float, and round a
// float result to the element type (to nearest even for bfloat16, as TensorFlow's and XLA's ops do).
inline float Widen(float v) { return v; }
inline float Widen(uint16_t v) { return FromBfloat16(v); }
template <typename Bits>
inline Bits Round(float v);
template <>
inline float Round<float>(float v) { return v; }
template <>
inline uint16_t Round<uint16_t>(float v) { return ToBfloat16(v); }

// A tensor type's elements as the row bodies take them: float, or bfloat16's bits.
template <typename T>
using BitsOf = typename std::conditional<std::is_same<T, float>::value, float, uint16_t>::type;

// A float32 value as TensorFlow's ops use it on T tensors: cast to T first (a scale attribute, a float32 bias).
template <typename T>
inline float RoundedTo(float value) {
  return Widen(Round<BitsOf<T>>(value));
}

// Partial sums and maxima over a row: GCC vectorizes a loop over these, not a plain float reduction, whose order it
// must keep. 8 floats, one AVX2 register: GCC kept 16-float (64-byte) vectors on the stack in the AVX2 clones, every
// iteration a store and reload (perf, Zen 3): our LayerNorm forward took 464 us on [800, 384] with 16, 225 with 8.
// Row loops keep two of them in flight (kLanes2 floats a step), so that an AVX-512 CPU still has as many independent
// additions per step as with one 16-float register. The helpers must inline into each target clone: called, a
// vector goes through memory, which made the softmax gradient 2x slower.
constexpr int kLanes = 8;
constexpr int kLanes2 = 2 * kLanes;
typedef float Lanes __attribute__((vector_size(4 * kLanes)));

__attribute__((always_inline)) inline Lanes LoadLanes(const float* values) {
  Lanes lanes;
  std::memcpy(&lanes, values, sizeof(Lanes));
  return lanes;
}

__attribute__((always_inline)) inline void StoreLanes(float* values, const Lanes& lanes) {
  std::memcpy(values, &lanes, sizeof(Lanes));
}

__attribute__((always_inline)) inline float SumOfLanes(const Lanes& lanes) {
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// The sum of a row of n floats, as two chains of Lanes (kLanes2 floats a step), then the remainder one by one.
__attribute__((always_inline)) inline float SumOfRow(const float* __restrict x, int64_t n) {
  Lanes sums = {}, more_sums = {};
  int64_t j = 0;
  for (; j + kLanes2 <= n; j += kLanes2) {
    sums += LoadLanes(x + j);
    more_sums += LoadLanes(x + j + kLanes);
  }
  for (; j + kLanes <= n; j += kLanes) sums += LoadLanes(x + j);
  float total = SumOfLanes(sums + more_sums);
  for (; j < n; ++j) total += x[j];
  return total;
}

// exp(x) for x <= 0 (Cephes' expf polynomial, within 2 ulp of the true value); 0 below -87.3, where the result would
// be subnormal; NaN stays NaN. Written without branches so that the row loops vectorize.
__attribute__((always_inline)) inline float ExpNonPositive(float x) {
  const float clamped = x < -87.3f ? -87.3f : x;
  const int32_t k = static_cast<int32_t>(clamped * 1.44269504088896341f - 0.5f);  // round(x / ln 2), as x <= 0
  const float n = static_cast<float>(k);
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln 2, ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t power_bits = static_cast<uint32_t>(k + 127) << 23;  // 2^n
  float power;
  std::memcpy(&power, &power_bits, 4);
  const float result = p * power;
  uint32_t bits;
  std::memcpy(&bits, &result, 4);
  bits &= 0u - static_cast<uint32_t>(!(x < -87.3f));
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// What Keras' Softmax adds to a logit where the attention mask is 0 (tf_keras softmax.py).
constexpr float kMaskedOut = -1e9f;

// Keras' softmax over a row of n floats, up to its division: x[j] = exp(x[j] - max(x)), in place; returns 1 / the
// sum of those. The maximum as two chains of Lanes (kLanes2 floats a step), the sum by SumOfRow.
__attribute__((always_inline)) inline float ExpMinusMaxInPlace(float* __restrict x, int64_t n) {
  const float lowest = -std::numeric_limits<float>::infinity();
  Lanes top = Lanes{} + lowest, more_top = top;
  int64_t j = 0;
  for (; j + kLanes2 <= n; j += kLanes2) {
    const Lanes values = LoadLanes(x + j), more_values = LoadLanes(x + j + kLanes);
    top = values > top ? values : top;
    more_top = more_values > more_top ? more_values : more_top;
  }
  for (; j + kLanes <= n; j += kLanes) {
    const Lanes values = LoadLanes(x + j);
    top = values > top ? values : top;
  }
  top = more_top > top ? more_top : top;
  float row_max = lowest;
  for (int l = 0; l < kLanes; ++l) row_max = top[l] > row_max ? top[l] : row_max;
  for (; j < n; ++j) row_max = x[j] > row_max ? x[j] : row_max;
  for (j = 0; j < n; ++j) x[j] = ExpNonPositive(x[j] - row_max);
  return 1.0f / SumOfRow(x, n);
}

// Rows per partial sum of SumColumnsInFixedChunks: fixed, so that the sums do not depend on the thread count.
constexpr int64_t kChunkRows = 32;

// Column sums (a gradient's dbias, dgamma) over `rows` rows, in parallel yet the same floats for any thread count:
// chunk_fn(first_row, end_row, sums) adds its rows' `width` terms into `sums`, a zeroed buffer per fixed chunk of
// kChunkRows rows (and does the rows' other work, e.g. writing dx); the chunks' sums are then added in order into
// `totals` (width floats). cost_per_row: Shard's estimate of one row's work.
template <typename ChunkFn>
void SumColumnsInFixedChunks(tensorflow::OpKernelContext* context, int64_t rows, int64_t width, int64_t cost_per_row,
                             float* totals, ChunkFn chunk_fn) {
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  std::vector<float> partials(chunks * width, 0.0f);
  auto work = [&](int64_t first_chunk, int64_t end_chunk) {
    for (int64_t chunk = first_chunk; chunk < end_chunk; ++chunk)
      chunk_fn(chunk * kChunkRows, std::min(rows, (chunk + 1) * kChunkRows), partials.data() + chunk * width);
  };
  auto* workers = context->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(workers->num_threads, workers->workers, chunks, cost_per_row * kChunkRows, work);
  std::fill(totals, totals + width, 0.0f);
  for (int64_t chunk = 0; chunk < chunks; ++chunk)  // in order
    for (int64_t j = 0; j < width; ++j) totals[j] += partials[chunk * width + j];
}

}  // namespace engine_kernels

#endif  // ENGINE_CPU_KERNELS_H_
