// Keyed dropout's forward pass on the CPU in one multi-threaded pass: the EngineKeyedDropout op that
// engine/dropout.py builds (through engine/native.py) and calls. Why it exists: see engine/dropout.py. Further
// down, the attention's masked softmax with its dropout (EngineSoftmaxDropout), which draws the same masks.
//
// The same numbers as engine/dropout.py's TensorFlow/XLA forward, bit for bit (tests/test_fusion.py):
//   word j         = output j of Philox-4x32-10 from (key, counter), as tf.random.stateless_uniform(uint32)
//                    draws it: block j / 4 at counter + j / 4 (a 128-bit add), lane j % 4
//   words          = ceil(n / 2) for n units; unit i < words takes the high 16 bits of word i, unit i >= words
//                    the low 16 bits of word i - words
//   keep           = those 16 bits >= threshold
//   y              = keep ? x * scale : 0, with scale first rounded to x's dtype and the product rounded once
//                    (round to nearest even for bfloat16), as TensorFlow's and XLA's Mul do
// The loops are written so that GCC vectorizes them (bit masks instead of float selects), and target_clones
// picks AVX-512, AVX2 or baseline code for the CPU at load time, since the library is built without -march.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"
#include "cpu_kernels.h"

namespace tensorflow {
namespace {

using namespace engine_kernels;  // NOLINT: ENGINE_CLONES, bfloat16 rounding, Lanes

REGISTER_OP("EngineKeyedDropout")
    .Input("x: T")
    .Input("philox_key: uint64")      // [1], as StatelessRandomGetKeyCounter gives it
    .Input("philox_counter: uint64")  // [2]
    .Output("y: T")
    .Output("keep: bool")
    .Attr("T: {float, bfloat16}")
    .Attr("threshold: int")
    .Attr("scale: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(0));
      return OkStatus();
    });

constexpr int kChunkBlocks = 256;  // Philox blocks (4 words each) per chunk: 4 KiB of words on the stack

// Philox-4x32-10 (Salmon et al., 2011) for `blocks` consecutive counters from counter + first_block.
ENGINE_CLONES void PhiloxWords(uint64_t counter_low, uint64_t counter_high, uint32_t key0, uint32_t key1,
                               int64_t first_block, int blocks, uint32_t* __restrict out) {
  for (int b = 0; b < blocks; ++b) {
    const uint64_t low = counter_low + static_cast<uint64_t>(first_block + b);
    const uint64_t high = counter_high + (low < counter_low ? 1 : 0);
    uint32_t c0 = static_cast<uint32_t>(low), c1 = static_cast<uint32_t>(low >> 32);
    uint32_t c2 = static_cast<uint32_t>(high), c3 = static_cast<uint32_t>(high >> 32);
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      c0 = n0;
      c2 = n2;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    out[4 * b] = c0;
    out[4 * b + 1] = c1;
    out[4 * b + 2] = c2;
    out[4 * b + 3] = c3;
  }
}

// v where kept, else +0.0: by masking the bits, since a float select would not vectorize.
inline float KeptOrZero(float v, uint32_t kept) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits &= 0u - kept;
  std::memcpy(&v, &bits, 4);
  return v;
}
inline uint16_t KeptOrZero(uint16_t v, uint32_t kept) { return static_cast<uint16_t>(v & (0u - kept)); }

// One unit of keyed dropout (float or bfloat16's bits): x * scale rounded once to x's type where kept, else 0.
// EngineSoftmaxDropout applies it to its probabilities too, so both ops give the same values.
template <typename Bits>
inline Bits Dropped(Bits x, uint32_t kept, float scale) {
  return KeptOrZero(Round<Bits>(Widen(x) * scale), kept);
}

// Units [0, count) from the 16 bits of words[i] at `shift`.
template <typename Bits>
__attribute__((always_inline)) inline void Apply(const Bits* __restrict x, Bits* __restrict y,
                                                 uint8_t* __restrict keep, const uint32_t* __restrict words,
                                                 int64_t count, int shift, uint32_t threshold, float scale) {
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t kept = ((words[i] >> shift) & 0xFFFFu) >= threshold;
    keep[i] = static_cast<uint8_t>(kept);
    y[i] = Dropped(x[i], kept, scale);
  }
}

ENGINE_CLONES void ApplyFloat(const float* x, float* y, uint8_t* keep, const uint32_t* words, int64_t count,
                              int shift, uint32_t threshold, float scale) {
  Apply(x, y, keep, words, count, shift, threshold, scale);
}

ENGINE_CLONES void ApplyBfloat16(const uint16_t* x, uint16_t* y, uint8_t* keep, const uint32_t* words,
                                 int64_t count, int shift, uint32_t threshold, float scale) {
  Apply(x, y, keep, words, count, shift, threshold, scale);
}


// Words [first, first + count) of the Philox stream, returned at out + first % 4 (whole blocks are drawn, so `out`
// holds count + 6 words).
const uint32_t* DrawWords(uint64_t counter_low, uint64_t counter_high, uint32_t key0, uint32_t key1, int64_t first,
                          int64_t count, uint32_t* out) {
  const int64_t first_block = first / 4;
  PhiloxWords(counter_low, counter_high, key0, key1, first_block,
              static_cast<int>((first + count + 3) / 4 - first_block), out);
  return out + first % 4;
}

// The 16-bit uniforms of units [first, first + count) of an n-unit mask (`words` = ceil(n / 2)), one per entry of
// `out` (shift 0), in the order described at the top; `scratch` holds count + 6 words.
void UnitUniforms(uint64_t counter_low, uint64_t counter_high, uint32_t key0, uint32_t key1, int64_t words,
                  int64_t first, int64_t count, uint32_t* out, uint32_t* scratch) {
  auto take = [&](int64_t word_begin, int64_t word_end, int shift, uint32_t* destination) {
    const uint32_t* drawn = DrawWords(counter_low, counter_high, key0, key1, word_begin, word_end - word_begin,
                                      scratch);
    for (int64_t w = 0; w < word_end - word_begin; ++w) destination[w] = (drawn[w] >> shift) & 0xFFFFu;
  };
  const int64_t end = first + count;
  if (first < words) take(first, std::min(end, words), 16, out);  // units below `words`: the words' high halves
  const int64_t low_first = std::max(first, words);
  if (low_first < end) take(low_first - words, end - words, 0, out + (low_first - first));
}

// The Philox key and counter of one call, as StatelessRandomGetKeyCounter gives them.
struct PhiloxKey {
  uint32_t key0, key1;
  uint64_t counter_low, counter_high;
};

// What both keyed-dropout ops read: the threshold and scale attributes, and the Philox inputs.
template <typename T>
class KeyedOpBase : public OpKernel {
 public:
  explicit KeyedOpBase(OpKernelConstruction* context) : OpKernel(context) {
    int threshold;
    OP_REQUIRES_OK(context, context->GetAttr("threshold", &threshold));
    OP_REQUIRES(context, threshold >= 0 && threshold <= 65536,
                errors::InvalidArgument("threshold must be in [0, 65536], got ", threshold));
    threshold_ = static_cast<uint32_t>(threshold);
    float scale;
    OP_REQUIRES_OK(context, context->GetAttr("scale", &scale));
    scale_ = RoundedTo<T>(scale);
  }

 protected:
  // False, with the op failed, unless `key` holds 1 value and `counter` 2.
  static bool ReadPhilox(OpKernelContext* context, const Tensor& key, const Tensor& counter, PhiloxKey* philox) {
    if (key.NumElements() != 1 || counter.NumElements() != 2) {
      context->CtxFailure(errors::InvalidArgument("philox_key must hold 1 value and philox_counter 2, got ",
                                                  key.NumElements(), " and ", counter.NumElements()));
      return false;
    }
    const uint64_t key_value = key.flat<uint64>()(0);
    *philox = {static_cast<uint32_t>(key_value), static_cast<uint32_t>(key_value >> 32), counter.flat<uint64>()(0),
               counter.flat<uint64>()(1)};
    return true;
  }

  uint32_t threshold_;
  float scale_;
};

template <typename T>
class KeyedDropoutOp : public KeyedOpBase<T> {
 public:
  explicit KeyedDropoutOp(OpKernelConstruction* context) : KeyedOpBase<T>(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    PhiloxKey philox;
    if (!this->ReadPhilox(context, context->input(1), context->input(2), &philox)) return;
    Tensor* y = nullptr;
    Tensor* keep = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(context, context->allocate_output(1, x.shape(), &keep));
    const int64_t n = x.NumElements();
    const int64_t words = (n + 1) / 2;
    const int64_t blocks = (words + 3) / 4;
    const uint32_t key0 = philox.key0, key1 = philox.key1;
    const uint64_t counter_low = philox.counter_low, counter_high = philox.counter_high;
    const T* x_data = x.flat<T>().data();
    T* y_data = y->flat<T>().data();
    uint8_t* keep_data = reinterpret_cast<uint8_t*>(keep->flat<bool>().data());
    const uint32_t threshold = this->threshold_;
    const float scale = this->scale_;

    auto apply = [&](int64_t offset, int64_t count, const uint32_t* chunk_words, int shift) {
      if (std::is_same<T, float>::value) {
        ApplyFloat(reinterpret_cast<const float*>(x_data) + offset, reinterpret_cast<float*>(y_data) + offset,
                   keep_data + offset, chunk_words, count, shift, threshold, scale);
      } else {
        ApplyBfloat16(reinterpret_cast<const uint16_t*>(x_data) + offset,
                      reinterpret_cast<uint16_t*>(y_data) + offset, keep_data + offset, chunk_words, count, shift,
                      threshold, scale);
      }
    };
    auto work = [&](int64_t first_chunk, int64_t end_chunk) {
      uint32_t chunk_words[4 * kChunkBlocks];
      for (int64_t chunk = first_chunk; chunk < end_chunk; ++chunk) {
        const int64_t first_block = chunk * kChunkBlocks;
        const int chunk_blocks = static_cast<int>(std::min<int64_t>(kChunkBlocks, blocks - first_block));
        PhiloxWords(counter_low, counter_high, key0, key1, first_block, chunk_blocks, chunk_words);
        const int64_t first_word = 4 * first_block;
        const int64_t count = std::min<int64_t>(4 * static_cast<int64_t>(chunk_blocks), words - first_word);
        apply(first_word, count, chunk_words, 16);  // the first half of the units: high halves
        const int64_t second = std::min<int64_t>(count, n - words - first_word);  // the rest: low halves
        if (second > 0) apply(words + first_word, second, chunk_words, 0);
      }
    };
    const int64_t chunks = (blocks + kChunkBlocks - 1) / kChunkBlocks;
    auto* workers = context->device()->tensorflow_cpu_worker_threads();
    // Cost per chunk in cycles, roughly: Philox's 10 rounds for 256 blocks plus 2048 units' loads and stores.
    Shard(workers->num_threads, workers->workers, chunks, 40 * 4 * kChunkBlocks, work);
  }
};

REGISTER_KERNEL_BUILDER(Name("EngineKeyedDropout").Device(DEVICE_CPU).TypeConstraint<float>("T"),
                        KeyedDropoutOp<float>);
REGISTER_KERNEL_BUILDER(Name("EngineKeyedDropout").Device(DEVICE_CPU).TypeConstraint<bfloat16>("T"),
                        KeyedDropoutOp<bfloat16>);

// ---------------------------------------------------------------------------------------------------------------
// Attention probabilities in training: Keras' masked softmax and keyed dropout as one pass (EngineSoftmaxDropout),
// and the gradient of both as another (EngineSoftmaxDropoutGrad). Why: TensorFlow runs them as ~10 ops, each a
// pass over the [batch, heads, queries, keys] tensor in Eigen's portable bfloat16 code (the mask's add alone took
// 18 ms of a 690 ms MiniLM step, the softmax gradient's four ops 34 ms; bench/RESULTS.md).
//   probs = softmax(logits + (1 - mask) * -1e9) over keys, in float32, rounded once to T; the mask [batch,
//           queries, keys] is shared by the heads, as Keras' MultiHeadAttention broadcasts it
//   y     = EngineKeyedDropout(probs) with the same key and counter, bit for bit (the same code below)
//   dlogits = probs * (g - sum(g * probs)) with g = (y != 0) ? dy * scale : 0, in float32, rounded once
// (where probs != 0, y == 0 exactly when the unit was dropped: probs * scale > probs cannot round to 0).

REGISTER_OP("EngineSoftmaxDropout")
    .Input("logits: T")               // [batch, heads, queries, keys]
    .Input("mask: float")             // [batch, queries, keys]: 1 attends, 0 does not
    .Input("philox_key: uint64")      // [1], as StatelessRandomGetKeyCounter gives it
    .Input("philox_counter: uint64")  // [2]
    .Output("y: T")
    .Output("probs: T")
    .Attr("T: {float, bfloat16}")
    .Attr("threshold: int")
    .Attr("scale: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(0));
      return OkStatus();
    });

REGISTER_OP("EngineSoftmaxDropoutGrad")
    .Input("upstream: T")  // the gradient of y
    .Input("probs: T")
    .Input("y: T")
    .Output("logits_grad: T")
    .Attr("T: {float, bfloat16}")
    .Attr("scale: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return OkStatus();
    });


// One row of EngineSoftmaxDropout: probs and y from logits, the mask row and the 16-bit uniforms
// (words[j] >> shift) & 0xFFFF; `x` is scratch for n floats.
template <typename Bits>
__attribute__((always_inline)) inline void SoftmaxDropoutRow(const Bits* __restrict logits,
                                                             const float* __restrict mask,
                                                             const uint32_t* __restrict words, int shift,
                                                             uint32_t threshold, float scale, float* __restrict x,
                                                             Bits* __restrict probs, Bits* __restrict y, int64_t n) {
  // Plain loops over j where GCC's loop vectorizer does best; the reductions over Lanes (ExpMinusMaxInPlace).
  for (int64_t j = 0; j < n; ++j) x[j] = Widen(logits[j]) + (1.0f - mask[j]) * kMaskedOut;
  const float inverse = ExpMinusMaxInPlace(x, n);
  for (int64_t j = 0; j < n; ++j) {  // the probability, then EngineKeyedDropout's select and scaled product on it
    const Bits probability = Round<Bits>(x[j] * inverse);
    probs[j] = probability;
    const uint32_t kept = ((words[j] >> shift) & 0xFFFFu) >= threshold;
    y[j] = Dropped(probability, kept, scale);
  }
}

ENGINE_CLONES void SoftmaxDropoutRowFloat(const float* logits, const float* mask, const uint32_t* words, int shift,
                                          uint32_t threshold, float scale, float* x, float* probs, float* y,
                                          int64_t n) {
  SoftmaxDropoutRow(logits, mask, words, shift, threshold, scale, x, probs, y, n);
}

ENGINE_CLONES void SoftmaxDropoutRowBfloat16(const uint16_t* logits, const float* mask, const uint32_t* words,
                                             int shift, uint32_t threshold, float scale, float* x, uint16_t* probs,
                                             uint16_t* y, int64_t n) {
  SoftmaxDropoutRow(logits, mask, words, shift, threshold, scale, x, probs, y, n);
}

// One row of EngineSoftmaxDropoutGrad: g = (y != 0) ? dy * scale : 0, dx = probs * (g - sum(g * probs)), in float32.
template <typename Bits>
__attribute__((always_inline)) inline void SoftmaxDropoutGradRow(const Bits* __restrict dy,
                                                                 const Bits* __restrict probs,
                                                                 const Bits* __restrict y, float scale,
                                                                 float* __restrict g, Bits* __restrict dx,
                                                                 int64_t n) {
  for (int64_t j = 0; j < n; ++j) g[j] = KeptOrZero(Widen(dy[j]) * scale, static_cast<uint32_t>(Widen(y[j]) != 0.0f));
  Lanes dots = {}, more_dots = {};
  int64_t j = 0;
  for (; j + kLanes2 <= n; j += kLanes2)
    for (int l = 0; l < kLanes; ++l) {
      dots[l] += g[j + l] * Widen(probs[j + l]);
      more_dots[l] += g[j + kLanes + l] * Widen(probs[j + kLanes + l]);
    }
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) dots[l] += g[j + l] * Widen(probs[j + l]);
  float total = SumOfLanes(dots + more_dots);
  for (; j < n; ++j) total += g[j] * Widen(probs[j]);
  for (j = 0; j < n; ++j) dx[j] = Round<Bits>(Widen(probs[j]) * (g[j] - total));
}

ENGINE_CLONES void SoftmaxDropoutGradRowFloat(const float* dy, const float* probs, const float* y, float scale,
                                              float* g, float* dx, int64_t n) {
  SoftmaxDropoutGradRow(dy, probs, y, scale, g, dx, n);
}

ENGINE_CLONES void SoftmaxDropoutGradRowBfloat16(const uint16_t* dy, const uint16_t* probs, const uint16_t* y,
                                                 float scale, float* g, uint16_t* dx, int64_t n) {
  SoftmaxDropoutGradRow(dy, probs, y, scale, g, dx, n);
}

template <typename T>
class SoftmaxDropoutOp : public KeyedOpBase<T> {
 public:
  explicit SoftmaxDropoutOp(OpKernelConstruction* context) : KeyedOpBase<T>(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& logits = context->input(0);
    const Tensor& mask = context->input(1);
    PhiloxKey philox;
    if (!this->ReadPhilox(context, context->input(2), context->input(3), &philox)) return;
    OP_REQUIRES(context, logits.dims() == 4 && mask.dims() == 3 && mask.dim_size(0) == logits.dim_size(0) &&
                             mask.dim_size(1) == logits.dim_size(2) && mask.dim_size(2) == logits.dim_size(3),
                errors::InvalidArgument("expected logits [batch, heads, queries, keys] and mask [batch, queries, "
                                        "keys], got ", logits.shape().DebugString(), " and ",
                                        mask.shape().DebugString()));
    Tensor* y = nullptr;
    Tensor* probs = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, logits.shape(), &y));
    OP_REQUIRES_OK(context, context->allocate_output(1, logits.shape(), &probs));
    const int64_t heads = logits.dim_size(1), queries = logits.dim_size(2), keys = logits.dim_size(3);
    const int64_t rows = logits.NumElements() / std::max<int64_t>(keys, 1);
    const int64_t words = (logits.NumElements() + 1) / 2;
    const uint32_t key0 = philox.key0, key1 = philox.key1;
    const uint64_t counter_low = philox.counter_low, counter_high = philox.counter_high;
    const T* logits_data = logits.flat<T>().data();
    const float* mask_data = mask.flat<float>().data();
    T* y_data = y->flat<T>().data();
    T* probs_data = probs->flat<T>().data();
    const int64_t group = std::max<int64_t>(1, 4096 / std::max<int64_t>(keys, 1));  // rows per Philox call
    const uint32_t threshold = this->threshold_;
    const float scale = this->scale_;

    // One row: softmax into probs, then the dropout with the 16-bit uniforms (row_words[j] >> shift) & 0xFFFF.
    auto softmax_row = [&](int64_t row, const uint32_t* row_words, int shift, float* x) {
      const int64_t offset = row * keys;
      const float* mask_row = mask_data + (row / (heads * queries) * queries + row % queries) * keys;
      if (std::is_same<T, float>::value) {
        SoftmaxDropoutRowFloat(reinterpret_cast<const float*>(logits_data) + offset, mask_row, row_words, shift,
                               threshold, scale, x, reinterpret_cast<float*>(probs_data) + offset,
                               reinterpret_cast<float*>(y_data) + offset, keys);
      } else {
        SoftmaxDropoutRowBfloat16(reinterpret_cast<const uint16_t*>(logits_data) + offset, mask_row, row_words,
                                  shift, threshold, scale, x, reinterpret_cast<uint16_t*>(probs_data) + offset,
                                  reinterpret_cast<uint16_t*>(y_data) + offset, keys);
      }
    };
    // With an even number of rows, row r and row r + rows / 2 take the high and the low halves of the same words
    // (r * keys onwards), so each word is drawn once; with an odd number, rows straddle the halves (UnitUniforms).
    const bool paired = rows % 2 == 0;
    auto work = [&](int64_t first, int64_t end) {  // rows, or pairs of rows
      std::vector<float> x(keys);
      std::vector<uint32_t> uniforms(group * keys), scratch(group * keys + 6);
      for (int64_t group_first = first; group_first < end; group_first += group) {
        const int64_t group_rows = std::min(group, end - group_first);
        if (paired) {
          const uint32_t* drawn = DrawWords(counter_low, counter_high, key0, key1, group_first * keys,
                                            group_rows * keys, scratch.data());
          for (int64_t row = group_first; row < group_first + group_rows; ++row) {
            const uint32_t* row_words = drawn + (row - group_first) * keys;
            softmax_row(row, row_words, 16, x.data());
            softmax_row(row + rows / 2, row_words, 0, x.data());
          }
        } else {
          UnitUniforms(counter_low, counter_high, key0, key1, words, group_first * keys, group_rows * keys,
                       uniforms.data(), scratch.data());
          for (int64_t row = group_first; row < group_first + group_rows; ++row)
            softmax_row(row, uniforms.data() + (row - group_first) * keys, 0, x.data());
        }
      }
    };
    auto* workers = context->device()->tensorflow_cpu_worker_threads();
    // Cost per row in cycles, roughly: the exp polynomial, Philox's rounds and the loads and stores per unit.
    const int64_t units = paired ? rows / 2 : rows;
    Shard(workers->num_threads, workers->workers, units, (paired ? 120 : 60) * keys, work);
  }
};

template <typename T>
class SoftmaxDropoutGradOp : public OpKernel {
 public:
  explicit SoftmaxDropoutGradOp(OpKernelConstruction* context) : OpKernel(context) {
    float scale;
    OP_REQUIRES_OK(context, context->GetAttr("scale", &scale));
    scale_ = RoundedTo<T>(scale);
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& upstream = context->input(0);
    const Tensor& probs = context->input(1);
    const Tensor& y = context->input(2);
    OP_REQUIRES(context, upstream.shape() == probs.shape() && probs.shape() == y.shape() && probs.dims() >= 1,
                errors::InvalidArgument("upstream, probs and y must have one shape, got ",
                                        upstream.shape().DebugString(), ", ", probs.shape().DebugString(), ", ",
                                        y.shape().DebugString()));
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, probs.shape(), &dx));
    const int64_t keys = probs.dim_size(probs.dims() - 1);
    const int64_t rows = probs.NumElements() / std::max<int64_t>(keys, 1);
    const T* dy_data = upstream.flat<T>().data();
    const T* probs_data = probs.flat<T>().data();
    const T* y_data = y.flat<T>().data();
    T* dx_data = dx->flat<T>().data();
    const float scale = scale_;

    auto work = [&](int64_t first_row, int64_t end_row) {
      std::vector<float> g(keys);
      for (int64_t row = first_row; row < end_row; ++row) {
        const int64_t offset = row * keys;
        if (std::is_same<T, float>::value) {
          SoftmaxDropoutGradRowFloat(reinterpret_cast<const float*>(dy_data) + offset,
                                     reinterpret_cast<const float*>(probs_data) + offset,
                                     reinterpret_cast<const float*>(y_data) + offset, scale, g.data(),
                                     reinterpret_cast<float*>(dx_data) + offset, keys);
        } else {
          SoftmaxDropoutGradRowBfloat16(reinterpret_cast<const uint16_t*>(dy_data) + offset,
                                        reinterpret_cast<const uint16_t*>(probs_data) + offset,
                                        reinterpret_cast<const uint16_t*>(y_data) + offset, scale, g.data(),
                                        reinterpret_cast<uint16_t*>(dx_data) + offset, keys);
        }
      }
    };
    auto* workers = context->device()->tensorflow_cpu_worker_threads();
    Shard(workers->num_threads, workers->workers, rows, 20 * keys, work);
  }

 private:
  float scale_;
};

#define ENGINE_REGISTER_ATTENTION_KERNELS(T)                                                                     \
  REGISTER_KERNEL_BUILDER(Name("EngineSoftmaxDropout").Device(DEVICE_CPU).TypeConstraint<T>("T"),               \
                          SoftmaxDropoutOp<T>);                                                                  \
  REGISTER_KERNEL_BUILDER(Name("EngineSoftmaxDropoutGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"),           \
                          SoftmaxDropoutGradOp<T>);
ENGINE_REGISTER_ATTENTION_KERNELS(float)
ENGINE_REGISTER_ATTENTION_KERNELS(bfloat16)

}  // namespace
}  // namespace tensorflow
