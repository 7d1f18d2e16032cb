// Keyed dropout's forward pass on the CPU in one multi-threaded pass: the EngineKeyedDropout op that
// engine/dropout.py builds (through engine/native.py) and calls. Why it exists: see engine/dropout.py.
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

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace tensorflow {
namespace {

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

#define ENGINE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

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

// Units [0, count) from the 16 bits of words[i] at `shift`.
ENGINE_CLONES void ApplyFloat(const float* __restrict x, float* __restrict y, uint8_t* __restrict keep,
                              const uint32_t* __restrict words, int64_t count, int shift, uint32_t threshold,
                              float scale) {
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t kept = ((words[i] >> shift) & 0xFFFFu) >= threshold;
    keep[i] = static_cast<uint8_t>(kept);
    const float product = x[i] * scale;
    uint32_t bits;  // +0.0 where dropped by masking the bits: a float select would not vectorize
    std::memcpy(&bits, &product, 4);
    bits &= 0u - kept;
    std::memcpy(&y[i], &bits, 4);
  }
}

ENGINE_CLONES void ApplyBfloat16(const uint16_t* __restrict x, uint16_t* __restrict y, uint8_t* __restrict keep,
                                 const uint32_t* __restrict words, int64_t count, int shift, uint32_t threshold,
                                 float scale) {
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t kept = ((words[i] >> shift) & 0xFFFFu) >= threshold;
    keep[i] = static_cast<uint8_t>(kept);
    const uint16_t product = ToBfloat16(FromBfloat16(x[i]) * scale);
    y[i] = kept ? product : static_cast<uint16_t>(0);
  }
}

template <typename T>
class KeyedDropoutOp : public OpKernel {
 public:
  explicit KeyedDropoutOp(OpKernelConstruction* context) : OpKernel(context) {
    int threshold;
    OP_REQUIRES_OK(context, context->GetAttr("threshold", &threshold));
    OP_REQUIRES(context, threshold >= 0 && threshold <= 65536,
                errors::InvalidArgument("threshold must be in [0, 65536], got ", threshold));
    threshold_ = static_cast<uint32_t>(threshold);
    float scale;
    OP_REQUIRES_OK(context, context->GetAttr("scale", &scale));
    // The scale as the TensorFlow forward multiplies by it: first cast to x's dtype.
    scale_ = std::is_same<T, bfloat16>::value ? FromBfloat16(ToBfloat16(scale)) : scale;
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    const Tensor& key = context->input(1);
    const Tensor& counter = context->input(2);
    OP_REQUIRES(context, key.NumElements() == 1 && counter.NumElements() == 2,
                errors::InvalidArgument("philox_key must hold 1 value and philox_counter 2, got ",
                                        key.NumElements(), " and ", counter.NumElements()));
    Tensor* y = nullptr;
    Tensor* keep = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(context, context->allocate_output(1, x.shape(), &keep));
    const int64_t n = x.NumElements();
    const int64_t words = (n + 1) / 2;
    const int64_t blocks = (words + 3) / 4;
    const uint64_t key_value = key.flat<uint64>()(0);
    const uint32_t key0 = static_cast<uint32_t>(key_value), key1 = static_cast<uint32_t>(key_value >> 32);
    const uint64_t counter_low = counter.flat<uint64>()(0), counter_high = counter.flat<uint64>()(1);
    const T* x_data = x.flat<T>().data();
    T* y_data = y->flat<T>().data();
    uint8_t* keep_data = reinterpret_cast<uint8_t*>(keep->flat<bool>().data());
    const uint32_t threshold = threshold_;
    const float scale = scale_;

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

 private:
  uint32_t threshold_;
  float scale_;
};

REGISTER_KERNEL_BUILDER(Name("EngineKeyedDropout").Device(DEVICE_CPU).TypeConstraint<float>("T"),
                        KeyedDropoutOp<float>);
REGISTER_KERNEL_BUILDER(Name("EngineKeyedDropout").Device(DEVICE_CPU).TypeConstraint<bfloat16>("T"),
                        KeyedDropoutOp<bfloat16>);

}  // namespace
}  // namespace tensorflow
