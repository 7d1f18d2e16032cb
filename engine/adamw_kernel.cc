// One-pass AdamW for float32 variables on the CPU: the EngineFusedAdamW op (and EngineFusedAdamWRows, for a
// gradient given as rows) that engine/adamw_kernel.py builds and engine/optimization.py's FusedAdamW calls.
// Why it exists: see engine/adamw_kernel.py.
//
// Per element, in the order TensorFlow's kernels apply them today (clip Mul, ResourceApplyGradientDescent for
// the decoupled decay, then ResourceApplyAdam), with the same float operations, so the results are equal bit
// for bit (built with -ffp-contract=off: no fused multiply-add):
//   g = grad * grad_scale                       (skipped when grad_scale == 1)
//   w = w - decay * w                           (skipped when decay == 0; decay = lr * weight_decay)
//   m = m + (g - m) * (1 - beta1)
//   v = v + (g * g - v) * (1 - beta2)
//   w = w - (m * alpha) / (sqrt(v) + epsilon),  alpha = lr * sqrt(1 - beta2^t) / (1 - beta1^t)
#define EIGEN_USE_THREADS

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/kernels/training_op_helpers.h"

namespace tensorflow {
namespace {

using CPUDevice = Eigen::ThreadPoolDevice;

REGISTER_OP("EngineFusedAdamW")
    .Input("var: resource")
    .Input("m: resource")
    .Input("v: resource")
    .Input("grad: float")
    .Input("grad_scale: float")
    .Input("lr: float")
    .Input("beta1_power: float")
    .Input("beta2_power: float")
    .Input("beta1: float")
    .Input("beta2: float")
    .Input("epsilon: float")
    .Input("decay: float")
    .SetIsStateful()
    .SetShapeFn([](shape_inference::InferenceContext*) { return absl::OkStatus(); });

// One pass over [begin, end), branch-free in the loop so that the compiler vectorizes it.
template <bool kScaled, bool kDecayed>
void Update(int64_t begin, int64_t end, const float* __restrict g, float scale, float decay, float one_minus_beta1,
            float one_minus_beta2, float alpha, float epsilon, float* __restrict w, float* __restrict m,
            float* __restrict v) {
  for (int64_t i = begin; i < end; ++i) {
    const float gi = kScaled ? g[i] * scale : g[i];
    float wi = w[i];
    if (kDecayed) wi = wi - decay * wi;
    const float mi = m[i] + (gi - m[i]) * one_minus_beta1;
    const float vi = v[i] + (gi * gi - v[i]) * one_minus_beta2;
    m[i] = mi;
    v[i] = vi;
    w[i] = wi - (mi * alpha) / (std::sqrt(vi) + epsilon);
  }
}

// The eight scalar inputs from `first` on (grad_scale, lr, beta1_power, beta2_power, beta1, beta2, epsilon,
// decay), as the per-element loop uses them.
struct Hyperparameters {
  float scale, decay, one_minus_beta1, one_minus_beta2, alpha, epsilon;
};

absl::Status ReadHyperparameters(OpKernelContext* ctx, int first, const std::string& op, Hyperparameters* h) {
  float s[8];
  for (int i = 0; i < 8; ++i) {
    const Tensor& t = ctx->input(first + i);
    if (!TensorShapeUtils::IsScalar(t.shape())) {
      return absl::InvalidArgumentError(op + ": hyperparameters must be scalars");
    }
    s[i] = t.scalar<float>()();
  }
  const float lr = s[1], beta1_power = s[2], beta2_power = s[3], beta1 = s[4], beta2 = s[5];
  // The same scalar expression as TensorFlow's ApplyAdam kernel.
  *h = {s[0], s[7], 1.0f - beta1, 1.0f - beta2, lr * std::sqrt(1.0f - beta2_power) / (1.0f - beta1_power), s[6]};
  return absl::OkStatus();
}

// The gradient's and the three variables' float buffers.
struct Buffers {
  const float* g;
  float *w, *m, *v;
};

Buffers BuffersOf(const Tensor& grad, Tensor& var, Tensor& m, Tensor& v) {
  return {grad.flat<float>().data(), var.flat<float>().data(), m.flat<float>().data(), v.flat<float>().data()};
}

// Update() over [begin, end) with the scale and decay branches taken once, outside the loop.
void UpdateSpan(const Hyperparameters& h, int64_t begin, int64_t end, const float* g, float* w, float* m, float* v) {
  const bool scaled = h.scale != 1.0f, decayed = h.decay != 0.0f;
  auto update = scaled && decayed ? Update<true, true>
                : scaled          ? Update<true, false>
                : decayed         ? Update<false, true>
                                  : Update<false, false>;
  update(begin, end, g, h.scale, h.decay, h.one_minus_beta1, h.one_minus_beta2, h.alpha, h.epsilon, w, m, v);
}

// var, m and v (inputs 0-2, locked by the caller), copied first only if something else still holds a buffer, as
// TensorFlow's own Apply* kernels do.
absl::Status ReadSlots(OpKernelContext* ctx, const std::string& op, Tensor* var, Tensor* m, Tensor* v) {
  TF_RETURN_IF_ERROR((GetInputTensorFromVariable<CPUDevice, float>(ctx, 0, true, false, var)));
  TF_RETURN_IF_ERROR((GetInputTensorFromVariable<CPUDevice, float>(ctx, 1, true, false, m)));
  TF_RETURN_IF_ERROR((GetInputTensorFromVariable<CPUDevice, float>(ctx, 2, true, false, v)));
  if (!var->IsInitialized() || !m->IsInitialized() || !v->IsInitialized()) {
    return absl::FailedPreconditionError(op + ": a variable is not initialized");
  }
  return absl::OkStatus();
}

class EngineFusedAdamWOp : public OpKernel {
 public:
  explicit EngineFusedAdamWOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    auto locks = MaybeLockVariableInputMutexesInOrder<CPUDevice, float>(ctx, /*do_lock=*/true,
                                                                        /*sparse=*/false, {0, 1, 2});
    Tensor var, m, v;
    OP_REQUIRES_OK(ctx, ReadSlots(ctx, "EngineFusedAdamW", &var, &m, &v));
    const Tensor& grad = ctx->input(3);
    OP_REQUIRES(ctx, var.shape().IsSameSize(m.shape()) && var.shape().IsSameSize(v.shape()) &&
                         var.shape().IsSameSize(grad.shape()),
                absl::InvalidArgumentError("EngineFusedAdamW: var, m, v and grad differ in shape: " +
                                           var.shape().DebugString() + " " + grad.shape().DebugString()));
    Hyperparameters h;
    OP_REQUIRES_OK(ctx, ReadHyperparameters(ctx, 4, "EngineFusedAdamW", &h));
    const Buffers b = BuffersOf(grad, var, m, v);
    auto shard = [&](int64_t begin, int64_t end) { UpdateSpan(h, begin, end, b.g, b.w, b.m, b.v); };
    // Per element: 4 floats read, 3 written, about 30 cycles of arithmetic (a division and a square root).
    const Eigen::TensorOpCost cost(4 * sizeof(float), 3 * sizeof(float), 30);
    ctx->eigen_cpu_device().parallelFor(var.NumElements(), cost, shard);
  }
};

REGISTER_KERNEL_BUILDER(Name("EngineFusedAdamW").Device(DEVICE_CPU), EngineFusedAdamWOp);

// The same update for a gradient given as rows: `rows[i]` is the gradient of row `indices[i]` of a [num_rows,
// width] variable (each index at most once; every other row's gradient is zero), as an embedding's gradient
// arrives (tf.IndexedSlices, deduplicated). Every row of m, v and the variable is still updated, as AdamW's
// dense update does (m and v decay where the gradient is zero); but the dense [num_rows, width] gradient is never
// built, filled and read: for MiniLM's 30,522 x 384 word embedding that is 47 MB written and read per update for
// the ~1,000 rows a batch touches. A row without a gradient goes through the same loop with a row of zeros, so
// the results equal the dense kernel's on the densified gradient bit for bit.
REGISTER_OP("EngineFusedAdamWRows")
    .Input("var: resource")
    .Input("m: resource")
    .Input("v: resource")
    .Input("rows: float")
    .Input("indices: Tindices")
    .Input("grad_scale: float")
    .Input("lr: float")
    .Input("beta1_power: float")
    .Input("beta2_power: float")
    .Input("beta1: float")
    .Input("beta2: float")
    .Input("epsilon: float")
    .Input("decay: float")
    .Attr("Tindices: {int32, int64}")
    .SetIsStateful()
    .SetShapeFn([](shape_inference::InferenceContext*) { return absl::OkStatus(); });

template <typename Tindex>
class EngineFusedAdamWRowsOp : public OpKernel {
 public:
  explicit EngineFusedAdamWRowsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    auto locks = MaybeLockVariableInputMutexesInOrder<CPUDevice, float>(ctx, /*do_lock=*/true,
                                                                        /*sparse=*/false, {0, 1, 2});
    Tensor var, m, v;
    OP_REQUIRES_OK(ctx, ReadSlots(ctx, "EngineFusedAdamWRows", &var, &m, &v));
    const Tensor& rows = ctx->input(3);
    const Tensor& indices = ctx->input(4);
    OP_REQUIRES(ctx, var.shape().IsSameSize(m.shape()) && var.shape().IsSameSize(v.shape()) && var.dims() >= 1,
                absl::InvalidArgumentError("EngineFusedAdamWRows: var, m and v differ in shape"));
    const int64_t num_rows = var.dim_size(0);
    const int64_t width = num_rows == 0 ? 0 : var.NumElements() / num_rows;
    const int64_t n = indices.NumElements();
    OP_REQUIRES(ctx, TensorShapeUtils::IsVector(indices.shape()) && rows.dims() >= 1 && rows.dim_size(0) == n &&
                         rows.NumElements() == n * width,
                absl::InvalidArgumentError("EngineFusedAdamWRows: rows " + rows.shape().DebugString() +
                                           " do not match indices " + indices.shape().DebugString() +
                                           " and the variable " + var.shape().DebugString()));
    // Which gradient row, if any, each variable row has.
    std::vector<int64_t> slot(num_rows, -1);
    const auto ids = indices.flat<Tindex>();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = static_cast<int64_t>(ids(i));
      OP_REQUIRES(ctx, r >= 0 && r < num_rows,
                  absl::InvalidArgumentError("EngineFusedAdamWRows: index out of range: " + std::to_string(r)));
      OP_REQUIRES(ctx, slot[r] < 0,
                  absl::InvalidArgumentError("EngineFusedAdamWRows: index repeated: " + std::to_string(r)));
      slot[r] = i;
    }
    Hyperparameters h;
    OP_REQUIRES_OK(ctx, ReadHyperparameters(ctx, 5, "EngineFusedAdamWRows", &h));
    const Buffers b = BuffersOf(rows, var, m, v);
    const std::vector<float> zeros(width, 0.0f);
    auto shard = [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* gr = slot[r] < 0 ? zeros.data() : b.g + slot[r] * width;
        UpdateSpan(h, 0, width, gr, b.w + r * width, b.m + r * width, b.v + r * width);
      }
    };
    // Per row: 3 floats read and 3 written per element (the gradient row mostly the shared zeros, in cache).
    const Eigen::TensorOpCost cost(3 * sizeof(float) * width, 3 * sizeof(float) * width, 30 * width);
    ctx->eigen_cpu_device().parallelFor(num_rows, cost, shard);
  }
};

REGISTER_KERNEL_BUILDER(Name("EngineFusedAdamWRows").Device(DEVICE_CPU).TypeConstraint<int32_t>("Tindices"),
                        EngineFusedAdamWRowsOp<int32_t>);
REGISTER_KERNEL_BUILDER(Name("EngineFusedAdamWRows").Device(DEVICE_CPU).TypeConstraint<int64_t>("Tindices"),
                        EngineFusedAdamWRowsOp<int64_t>);

}  // namespace
}  // namespace tensorflow
