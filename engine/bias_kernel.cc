// A dense layer's bias in training on the CPU. engine/bias.py builds these ops (through engine/native.py) and says
// why they exist.
//
// EngineBiasAdd: x + round_T(bias) rounded to T, the bits of TensorFlow's AddV2 (forward only).
//
// The FFN's bias add and exact GELU: one pass forward (EngineBiasGelu) and one backward (EngineBiasGeluGrad), which
// recomputes the pre-activation from the dense layer's product and the bias instead of keeping it. Per unit, with T
// the tensors' type (float or bfloat16):
//   a       = x + round_T(bias) in float32         (TensorFlow's AddV2 would round a to T first: a rounding less)
//   y       = round_T(gelu(a)),  gelu(a) = a / 2 * (1 + erf(a / sqrt 2)) in float32 (Keras' gelu, exact form)
//   dx      = round_T(gelu'(a) * dy),  gelu'(a) = (1 + erf(a / sqrt 2)) / 2 + a * exp(-a^2 / 2) / sqrt(2 pi)
//   dbias   = the column sums of dx in float32, over fixed chunks of rows added in order (the same sums for any
//             thread count)
#include <algorithm>
#include <cstdint>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"
#include "cpu_kernels.h"

namespace tensorflow {
namespace {

using namespace engine_kernels;  // NOLINT: ENGINE_CLONES, bfloat16 rounding, ExpNonPositive

REGISTER_OP("EngineBiasGelu")
    .Input("x: T")       // [..., n]: a dense layer's product, before its bias
    .Input("bias: float")  // [n]
    .Output("y: T")
    .Attr("T: {float, bfloat16}")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return OkStatus();
    });

REGISTER_OP("EngineBiasAdd")
    .Input("x: T")         // [..., n]
    .Input("bias: float")  // [n], rounded to T first
    .Output("y: T")
    .Attr("T: {float, bfloat16}")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return OkStatus();
    });

REGISTER_OP("EngineBiasGeluGrad")
    .Input("upstream: T")  // the gradient of y
    .Input("x: T")
    .Input("bias: float")
    .Output("x_grad: T")
    .Output("bias_grad: float")
    .Attr("T: {float, bfloat16}")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(1));
      c->set_output(1, c->input(2));
      return OkStatus();
    });

// erf(x) in float32, without branches so that the row loops vectorize: the rational approximation (odd degree 13
// over even degree 8, on [-4, 4], outside which erf rounds to +-1) whose coefficients Eigen's and XLA's float erf
// use, within a few ulp of the true value; NaN stays NaN. Fused multiply-adds (exactly rounded, so the same on
// every CPU; a library call on CPUs without FMA) halve the polynomials' work: the op's bfloat16 pass ran ~1.3x.
inline float Erf(float x) {
  const float c = x > 4.0f ? 4.0f : (x < -4.0f ? -4.0f : x);
  const float c2 = c * c;
  float p = __builtin_fmaf(c2, -2.72614225801306e-10f, 2.77068142495902e-08f);
  p = __builtin_fmaf(c2, p, -2.10102402082508e-06f);
  p = __builtin_fmaf(c2, p, -5.69250639462346e-05f);
  p = __builtin_fmaf(c2, p, -7.34990630326855e-04f);
  p = __builtin_fmaf(c2, p, -2.95459980854025e-03f);
  p = __builtin_fmaf(c2, p, -1.60960333262415e-02f);
  float q = __builtin_fmaf(c2, -1.45660718464996e-05f, -2.13374055278905e-04f);
  q = __builtin_fmaf(c2, q, -1.68282697438203e-03f);
  q = __builtin_fmaf(c2, q, -7.37332916720468e-03f);
  q = __builtin_fmaf(c2, q, -1.42647390514189e-02f);
  return c * p / q;
}

constexpr float kInverseSqrt2 = 0.707106781186547524f;
constexpr float kInverseSqrt2Pi = 0.398942280401432678f;

// The pre-activation a of unit j, not rounded to T (in bfloat16 the rounding took as long as the GELU);
// `bias` is already rounded to T.
template <typename Bits>
__attribute__((always_inline)) inline float PreActivation(const Bits* x, const float* bias, int64_t j) {
  return Widen(x[j]) + bias[j];
}

template <typename Bits>
__attribute__((always_inline)) inline void ForwardRow(const Bits* __restrict x, const float* __restrict bias,
                                                      Bits* __restrict y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float a = PreActivation(x, bias, j);
    y[j] = Round<Bits>(0.5f * a * (1.0f + Erf(a * kInverseSqrt2)));
  }
}

// Adds the row's dx into `bias_sums`.
template <typename Bits>
__attribute__((always_inline)) inline void BackwardRow(const Bits* __restrict dy, const Bits* __restrict x,
                                                       const float* __restrict bias, Bits* __restrict dx,
                                                       float* __restrict bias_sums, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float a = PreActivation(x, bias, j);
    const float slope = 0.5f * (1.0f + Erf(a * kInverseSqrt2)) + a * kInverseSqrt2Pi * ExpNonPositive(-0.5f * a * a);
    const Bits grad = Round<Bits>(slope * Widen(dy[j]));
    dx[j] = grad;
    bias_sums[j] += Widen(grad);
  }
}

template <typename Bits>
__attribute__((always_inline)) inline void AddRow(const Bits* __restrict x, const float* __restrict bias,
                                                  Bits* __restrict y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = Round<Bits>(Widen(x[j]) + bias[j]);
}

// The row bodies compiled per target level, overloaded for float and bfloat16's bits (BitsOf<T>).
ENGINE_CLONES void ForwardRowOf(const float* x, const float* bias, float* y, int64_t n) { ForwardRow(x, bias, y, n); }
ENGINE_CLONES void ForwardRowOf(const uint16_t* x, const float* bias, uint16_t* y, int64_t n) {
  ForwardRow(x, bias, y, n);
}
ENGINE_CLONES void BackwardRowOf(const float* dy, const float* x, const float* bias, float* dx, float* sums,
                                 int64_t n) {
  BackwardRow(dy, x, bias, dx, sums, n);
}
ENGINE_CLONES void BackwardRowOf(const uint16_t* dy, const uint16_t* x, const float* bias, uint16_t* dx, float* sums,
                                 int64_t n) {
  BackwardRow(dy, x, bias, dx, sums, n);
}
ENGINE_CLONES void AddRowOf(const float* x, const float* bias, float* y, int64_t n) { AddRow(x, bias, y, n); }
ENGINE_CLONES void AddRowOf(const uint16_t* x, const float* bias, uint16_t* y, int64_t n) { AddRow(x, bias, y, n); }

// The bias as the ops add it, rounded to T. False, with the op failed, unless it has one value per unit of x's last
// axis.
template <typename T>
bool BiasInT(OpKernelContext* context, const Tensor& x, const Tensor& bias, std::vector<float>* rounded) {
  if (x.dims() < 1 || bias.NumElements() != x.dim_size(x.dims() - 1)) {
    context->CtxFailure(errors::InvalidArgument("bias must hold one value per unit of x's last axis, got ",
                                                bias.shape().DebugString(), " for ", x.shape().DebugString()));
    return false;
  }
  const float* values = bias.flat<float>().data();
  rounded->resize(bias.NumElements());
  for (int64_t j = 0; j < bias.NumElements(); ++j) (*rounded)[j] = RoundedTo<T>(values[j]);
  return true;
}

// EngineBiasAdd (kGelu false) and EngineBiasGelu (kGelu true).
template <typename T, bool kGelu>
class BiasForwardOp : public OpKernel {
 public:
  explicit BiasForwardOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    std::vector<float> bias;
    if (!BiasInT<T>(context, x, context->input(1), &bias)) return;
    Tensor* y = nullptr;  // in place where nothing else uses x (the bias add's product; GELU's backward keeps it)
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0}, 0, x.shape(), &y));
    const int64_t n = x.dim_size(x.dims() - 1);
    const int64_t rows = n == 0 ? 0 : x.NumElements() / n;
    const BitsOf<T>* x_data = reinterpret_cast<const BitsOf<T>*>(x.flat<T>().data());
    BitsOf<T>* y_data = reinterpret_cast<BitsOf<T>*>(y->flat<T>().data());
    auto work = [&](int64_t first, int64_t end) {
      for (int64_t row = first; row < end; ++row) {
        if (kGelu) {
          ForwardRowOf(x_data + row * n, bias.data(), y_data + row * n, n);
        } else {
          AddRowOf(x_data + row * n, bias.data(), y_data + row * n, n);
        }
      }
    };
    auto* workers = context->device()->tensorflow_cpu_worker_threads();
    Shard(workers->num_threads, workers->workers, rows, (kGelu ? 30 : 3) * n, work);  // cycles per row, roughly
  }
};

template <typename T>
class BiasGeluGradOp : public OpKernel {
 public:
  explicit BiasGeluGradOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& upstream = context->input(0);
    const Tensor& x = context->input(1);
    OP_REQUIRES(context, upstream.shape() == x.shape(),
                errors::InvalidArgument("upstream and x must have one shape, got ", upstream.shape().DebugString(),
                                        " and ", x.shape().DebugString()));
    std::vector<float> bias;
    if (!BiasInT<T>(context, x, context->input(2), &bias)) return;
    Tensor* dx = nullptr;
    Tensor* dbias = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &dx));
    OP_REQUIRES_OK(context, context->allocate_output(1, context->input(2).shape(), &dbias));
    const int64_t n = x.dim_size(x.dims() - 1);
    const int64_t rows = n == 0 ? 0 : x.NumElements() / n;
    const BitsOf<T>* dy_data = reinterpret_cast<const BitsOf<T>*>(upstream.flat<T>().data());
    const BitsOf<T>* x_data = reinterpret_cast<const BitsOf<T>*>(x.flat<T>().data());
    BitsOf<T>* dx_data = reinterpret_cast<BitsOf<T>*>(dx->flat<T>().data());
    SumColumnsInFixedChunks(context, rows, n, 50 * n, dbias->flat<float>().data(),
                            [&](int64_t first_row, int64_t end_row, float* dbias_sums) {
                              for (int64_t row = first_row; row < end_row; ++row)
                                BackwardRowOf(dy_data + row * n, x_data + row * n, bias.data(), dx_data + row * n,
                                              dbias_sums, n);
                            });
  }
};

#define ENGINE_REGISTER_BIAS_GELU_KERNELS(T)                                                                     \
  REGISTER_KERNEL_BUILDER(Name("EngineBiasGelu").Device(DEVICE_CPU).TypeConstraint<T>("T"),                    \
                          BiasForwardOp<T, true>);                                                           \
  REGISTER_KERNEL_BUILDER(Name("EngineBiasAdd").Device(DEVICE_CPU).TypeConstraint<T>("T"),                     \
                          BiasForwardOp<T, false>);                                                          \
  REGISTER_KERNEL_BUILDER(Name("EngineBiasGeluGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"), BiasGeluGradOp<T>);
ENGINE_REGISTER_BIAS_GELU_KERNELS(float)
ENGINE_REGISTER_BIAS_GELU_KERNELS(bfloat16)

}  // namespace
}  // namespace tensorflow
