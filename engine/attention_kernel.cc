// Self-attention at inference over each sentence's token rows, as one multi-threaded pass (EngineTokenAttention):
// the op engine/attention.py's token_attention builds (through engine/native.py) for Transformer blocks that run
// on a batch's real tokens (engine/unpadding.py). Why it exists: see token_attention.
//
// Inputs are the blocks' token rows, sentence after sentence (rows in the order of their flat positions
// b * seq + s in the padded batch), and Keras' attention mask over the padded positions. For each sentence b and
// head h, with i, j over that sentence's rows:
//   logits[i, j] = (query[i, h] * scale) . key[j, h] + (1 - mask[b, s_i, s_j]) * -1e9   (Keras' masked softmax)
//   context[i, h] = sum_j softmax_j(logits[i, :]) * value[j, h]
// which is Keras' MultiHeadAttention on the padded layout for every token row whenever padded positions are masked
// out as keys (they are under BERT's padding mask: a padded key gets weight exp(-1e9) = 0 there).
//
// float32 or bfloat16 operands (T; the mask is float32 either way). In bfloat16 the scale is rounded to bfloat16
// as the stock layer's multiply rounds it, and everything after the loads runs in float32: only the context is
// rounded (to nearest even), where the stock layer also rounds the scaled query, the logits and the probabilities.
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

using namespace engine_kernels;  // NOLINT: ENGINE_CLONES, Lanes, kMaskedOut, ExpMinusMaxInPlace

REGISTER_OP("EngineTokenAttention")
    .Input("query: T")          // [..., rows, heads, head_dim]: leading dims of size 1
    .Input("key: T")            // the query's shape
    .Input("value: T")          // the query's shape
    .Input("positions: int32")  // [rows]: each row's flat position b * seq + s in the padded batch, ascending
    .Input("mask: float")       // [batch, seq, seq]: 1 attends, 0 does not
    .Output("context: T")       // the query's shape
    .Attr("T: {float, bfloat16}")
    .Attr("scale: float")       // the query's factor before the product (Keras: 1 / sqrt(head_dim))
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return OkStatus();
    });

constexpr int64_t kQueryBlock = 4;   // query rows whose logits are computed together (each key load used 4 times)
constexpr int64_t kKeyBlock = kLanes2;  // keys per step of the logits (two Lanes)

// One sentence and head: `rows` token rows; q/k/v/out point at the sentence's first row of this head, rows `stride`
// elements apart; mask_rows[i] is query i's mask row over the padded keys, key_slots[j] key j's position in it
// (`contiguous`: the positions are consecutive). Bits: float, or bfloat16's bits (uint16_t). Scratch: kt (head_dim
// x padded), logits (kQueryBlock x padded), scaled_query (kQueryBlock x head_dim), and for bfloat16 only widened
// (rows x head_dim: the value rows in float32) and context_row (head_dim); padded = rows rounded up to kKeyBlock.
template <typename Bits>
__attribute__((always_inline)) inline void AttendSentenceHead(const Bits* __restrict q, const Bits* __restrict k,
                                                              const Bits* __restrict v, Bits* __restrict out,
                                                              int64_t rows, int64_t stride, int64_t head_dim,
                                                              float scale, const float* const* mask_rows,
                                                              const int32_t* __restrict key_slots, bool contiguous,
                                                              float* __restrict kt, float* __restrict logits,
                                                              float* __restrict scaled_query,
                                                              float* __restrict widened,
                                                              float* __restrict context_row) {
  constexpr bool kFloat = std::is_same<Bits, float>::value;
  const int64_t padded = (rows + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  // Keys transposed, [head_dim, padded], zero beyond the rows: the logits then vectorize over keys.
  for (int64_t d = 0; d < head_dim; ++d) {
    for (int64_t j = 0; j < rows; ++j) kt[d * padded + j] = Widen(k[j * stride + d]);
    for (int64_t j = rows; j < padded; ++j) kt[d * padded + j] = 0.0f;
  }
  // The value rows as the context loops read them: in place for float32, widened once per head for bfloat16.
  const float* values = nullptr;
  int64_t value_stride = stride;
  if constexpr (kFloat) {
    values = v;
  } else {
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t d = 0; d < head_dim; ++d) widened[j * head_dim + d] = Widen(v[j * stride + d]);
    values = widened;
    value_stride = head_dim;
  }
  for (int64_t first = 0; first < rows; first += kQueryBlock) {
    const int64_t block = std::min(kQueryBlock, rows - first);
    for (int64_t r = 0; r < kQueryBlock; ++r)  // rows past the block repeat its last (their results are unused)
      for (int64_t d = 0; d < head_dim; ++d)
        scaled_query[r * head_dim + d] = Widen(q[(first + std::min(r, block - 1)) * stride + d]) * scale;
    const float* q0 = scaled_query;
    const float* q1 = scaled_query + head_dim;
    const float* q2 = scaled_query + 2 * head_dim;
    const float* q3 = scaled_query + 3 * head_dim;
    for (int64_t j = 0; j < padded; j += kKeyBlock) {
      Lanes a0 = {}, b0 = {}, a1 = {}, b1 = {}, a2 = {}, b2 = {}, a3 = {}, b3 = {};
      const float* column = kt + j;
      for (int64_t d = 0; d < head_dim; ++d, column += padded) {
        const Lanes low = LoadLanes(column), high = LoadLanes(column + kLanes);
        a0 += q0[d] * low;
        b0 += q0[d] * high;
        a1 += q1[d] * low;
        b1 += q1[d] * high;
        a2 += q2[d] * low;
        b2 += q2[d] * high;
        a3 += q3[d] * low;
        b3 += q3[d] * high;
      }
      StoreLanes(logits + j, a0);
      StoreLanes(logits + j + kLanes, b0);
      StoreLanes(logits + padded + j, a1);
      StoreLanes(logits + padded + j + kLanes, b1);
      StoreLanes(logits + 2 * padded + j, a2);
      StoreLanes(logits + 2 * padded + j + kLanes, b2);
      StoreLanes(logits + 3 * padded + j, a3);
      StoreLanes(logits + 3 * padded + j + kLanes, b3);
    }
    for (int64_t r = 0; r < block; ++r) {
      const int64_t i = first + r;
      float* x = logits + r * padded;
      const float* mask_row = mask_rows[i];
      if (contiguous) {  // the sentence's positions are consecutive: its keys' mask entries too
        const float* keys_mask = mask_row + key_slots[0];
        for (int64_t j = 0; j < rows; ++j) x[j] += (1.0f - keys_mask[j]) * kMaskedOut;
      } else {
        for (int64_t j = 0; j < rows; ++j) x[j] += (1.0f - mask_row[key_slots[j]]) * kMaskedOut;
      }
      const float inverse = ExpMinusMaxInPlace(x, rows);  // Keras' softmax, as EngineSoftmaxDropout's
      for (int64_t j = 0; j < rows; ++j) x[j] *= inverse;
      // The context row: the probabilities' sum of value rows, 4 Lanes of features at a time, then 1, then single.
      float* context = kFloat ? reinterpret_cast<float*>(out + i * stride) : context_row;
      int64_t d = 0;
      for (; d + 4 * kLanes <= head_dim; d += 4 * kLanes) {
        Lanes c0 = {}, c1 = {}, c2 = {}, c3 = {};
        const float* value = values + d;
        for (int64_t j = 0; j < rows; ++j, value += value_stride) {
          c0 += x[j] * LoadLanes(value);
          c1 += x[j] * LoadLanes(value + kLanes);
          c2 += x[j] * LoadLanes(value + 2 * kLanes);
          c3 += x[j] * LoadLanes(value + 3 * kLanes);
        }
        StoreLanes(context + d, c0);
        StoreLanes(context + d + kLanes, c1);
        StoreLanes(context + d + 2 * kLanes, c2);
        StoreLanes(context + d + 3 * kLanes, c3);
      }
      for (; d + kLanes <= head_dim; d += kLanes) {
        Lanes c0 = {};
        for (int64_t j = 0; j < rows; ++j) c0 += x[j] * LoadLanes(values + j * value_stride + d);
        StoreLanes(context + d, c0);
      }
      for (; d < head_dim; ++d) {
        float c = 0.0f;
        for (int64_t j = 0; j < rows; ++j) c += x[j] * values[j * value_stride + d];
        context[d] = c;
      }
      if constexpr (!kFloat) {
        for (int64_t e = 0; e < head_dim; ++e) out[i * stride + e] = Round<Bits>(context_row[e]);
      }
    }
  }
}

// The target clones, one overload per element type (GCC clones functions, not templates).
ENGINE_CLONES void AttendSentenceHeadCloned(const float* q, const float* k, const float* v, float* out, int64_t rows,
                                            int64_t stride, int64_t head_dim, float scale,
                                            const float* const* mask_rows, const int32_t* key_slots, bool contiguous,
                                            float* kt, float* logits, float* scaled_query, float* widened,
                                            float* context_row) {
  AttendSentenceHead(q, k, v, out, rows, stride, head_dim, scale, mask_rows, key_slots, contiguous, kt, logits,
                     scaled_query, widened, context_row);
}

ENGINE_CLONES void AttendSentenceHeadCloned(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out,
                                            int64_t rows, int64_t stride, int64_t head_dim, float scale,
                                            const float* const* mask_rows, const int32_t* key_slots, bool contiguous,
                                            float* kt, float* logits, float* scaled_query, float* widened,
                                            float* context_row) {
  AttendSentenceHead(q, k, v, out, rows, stride, head_dim, scale, mask_rows, key_slots, contiguous, kt, logits,
                     scaled_query, widened, context_row);
}

template <typename T>
class TokenAttentionOp : public OpKernel {
 public:
  explicit TokenAttentionOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("scale", &scale_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& query = context->input(0);
    const Tensor& key = context->input(1);
    const Tensor& value = context->input(2);
    const Tensor& positions = context->input(3);
    const Tensor& mask = context->input(4);
    OP_REQUIRES(context, query.dims() >= 3 && key.shape() == query.shape() && value.shape() == query.shape(),
                errors::InvalidArgument("expected query, key and value of one shape [..., rows, heads, head_dim], "
                                        "got ", query.shape().DebugString(), ", ", key.shape().DebugString(),
                                        ", ", value.shape().DebugString()));
    const int64_t heads = query.dim_size(query.dims() - 2), head_dim = query.dim_size(query.dims() - 1);
    const int64_t rows = heads * head_dim == 0 ? 0 : query.NumElements() / (heads * head_dim);
    OP_REQUIRES(context, positions.dims() == 1 && positions.dim_size(0) == rows && mask.dims() == 3 &&
                             mask.dim_size(1) == mask.dim_size(2),
                errors::InvalidArgument("expected positions [rows] and mask [batch, seq, seq], got ",
                                        positions.shape().DebugString(), " and ", mask.shape().DebugString(),
                                        " for ", rows, " rows"));
    Tensor* context_out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, query.shape(), &context_out));
    if (rows == 0) return;
    const int64_t seq = mask.dim_size(1), slots = mask.dim_size(0) * seq;
    const int32_t* position = positions.flat<int32>().data();
    // Sentences: runs of rows with one b = position / seq; positions must ascend within the padded batch.
    std::vector<int64_t> starts;       // each sentence's first row, then `rows`
    std::vector<int32_t> key_slots(rows);  // each row's s
    std::vector<const float*> mask_rows(rows);
    const float* mask_data = mask.flat<float>().data();
    for (int64_t r = 0; r < rows; ++r) {
      OP_REQUIRES(context, position[r] >= 0 && position[r] < slots && (r == 0 || position[r] > position[r - 1]),
                  errors::InvalidArgument("positions must ascend within [0, ", slots, "), got ", position[r],
                                          " at row ", r));
      if (r == 0 || position[r] / seq != position[r - 1] / seq) starts.push_back(r);
      key_slots[r] = position[r] % seq;
      mask_rows[r] = mask_data + static_cast<int64_t>(position[r]) * seq;  // [b, s, :]
    }
    starts.push_back(rows);
    const int64_t sentences = static_cast<int64_t>(starts.size()) - 1;
    const int64_t longest = [&] {
      int64_t most = 0;
      for (int64_t s = 0; s < sentences; ++s) most = std::max(most, starts[s + 1] - starts[s]);
      return most;
    }();
    const int64_t stride = heads * head_dim;
    using Bits = BitsOf<T>;
    const Bits* q = reinterpret_cast<const Bits*>(query.flat<T>().data());
    const Bits* k = reinterpret_cast<const Bits*>(key.flat<T>().data());
    const Bits* v = reinterpret_cast<const Bits*>(value.flat<T>().data());
    Bits* out = reinterpret_cast<Bits*>(context_out->flat<T>().data());
    const float scale = RoundedTo<T>(scale_);  // as the stock layer's multiply on T operands
    auto work = [&](int64_t first_unit, int64_t end_unit) {  // unit = sentence * heads + head
      const int64_t padded = (longest + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
      std::vector<float> kt(head_dim * padded), logits(kQueryBlock * padded), scaled_query(kQueryBlock * head_dim);
      const bool widens = !std::is_same<T, float>::value;  // bfloat16: value rows and the context row in float32
      std::vector<float> widened(widens ? longest * head_dim : 0), context_row(widens ? head_dim : 0);
      // Each head reads head_dim elements of every row of its sentence, which the hardware prefetchers did not
      // see coming: loads of Q, K and V missing the cache took ~40 % of the op. So the next sentence's rows are
      // prefetched while this one's heads run (its own too, at the start of the range).
      auto prefetch = [&](int64_t sentence) {
        if (sentence >= sentences) return;
        constexpr int64_t kPerLine = 64 / sizeof(Bits);  // elements per cache line
        for (const Bits* block : {q, k, v})
          for (int64_t at = starts[sentence] * stride; at < starts[sentence + 1] * stride; at += kPerLine)
            __builtin_prefetch(block + at, 0, 2);  // to L2: 150 KB for 40 rows of float32 would overflow L1
      };
      prefetch(first_unit / heads);
      for (int64_t unit = first_unit; unit < end_unit; ++unit) {
        const int64_t sentence = unit / heads, head = unit % heads;
        if (head == 0 || unit == first_unit) prefetch(sentence + 1);
        const int64_t first = starts[sentence], count = starts[sentence + 1] - first;
        const int64_t offset = first * stride + head * head_dim;
        AttendSentenceHeadCloned(q + offset, k + offset, v + offset, out + offset, count, stride, head_dim, scale,
                                 mask_rows.data() + first, key_slots.data() + first,
                                 key_slots[first + count - 1] - key_slots[first] == count - 1, kt.data(),
                                 logits.data(), scaled_query.data(), widened.data(), context_row.data());
      }
    };
    auto* workers = context->device()->tensorflow_cpu_worker_threads();
    // Cost per unit in cycles, roughly: two products of (average rows)^2 x head_dim and the softmax's exps.
    const int64_t average = std::max<int64_t>(rows / sentences, 1);
    Shard(workers->num_threads, workers->workers, sentences * heads, average * average * (head_dim / 4 + 20), work);
  }

 private:
  float scale_;
};

REGISTER_KERNEL_BUILDER(Name("EngineTokenAttention").Device(DEVICE_CPU).TypeConstraint<float>("T"),
                        TokenAttentionOp<float>);
REGISTER_KERNEL_BUILDER(Name("EngineTokenAttention").Device(DEVICE_CPU).TypeConstraint<bfloat16>("T"),
                        TokenAttentionOp<bfloat16>);

}  // namespace
}  // namespace tensorflow
