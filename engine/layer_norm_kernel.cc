// LayerNorm over the last axis in training on the CPU, as one pass forward (EngineLayerNorm, which keeps each row's
// mean and 1/std for the gradient) and one backward (EngineLayerNormGrad). engine/layer_norm.py builds them
// (through engine/native.py) and says why they exist. float32 only: Model Garden's LayerNorms compute in float32
// under every policy (their inputs are cast up).
//   forward   mean and variance of the row; inverse_j = rsqrt(variance + epsilon) * gamma_j;
//             y_j = x_j * inverse_j + (beta_j - mean * inverse_j) (Keras' batch_normalization form)
//   backward  x_hat = (x - mean) * rstd, g = dy * gamma: dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat));
//             dgamma = sum over rows of dy * x_hat, dbeta = sum of dy. These column sums run over fixed chunks of
//             rows, added in order, so they do not depend on the thread count.
// EngineAddLayerNorm is the forward of LayerNorm(x + residual) with x and the residual in float32 or bfloat16:
// the sum in float32 (no rounding to bfloat16 first, as TensorFlow's bf16 add would) and kept as an output, the
// input of EngineLayerNormGrad. It saves the add and the casts to float32 that Model Garden's block runs before
// each of its float32 LayerNorms.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"
#include "cpu_kernels.h"

namespace tensorflow {
namespace {

using namespace engine_kernels;  // NOLINT: ENGINE_CLONES, Lanes, Widen

REGISTER_OP("EngineLayerNorm")
    .Input("x: float")  // [..., features]
    .Input("gamma: float")
    .Input("beta: float")
    .Output("y: float")
    .Output("mean: float")  // [...]
    .Output("rstd: float")  // [...]: rsqrt(variance + epsilon)
    .Attr("epsilon: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle rows;
      TF_RETURN_IF_ERROR(c->Subshape(c->input(0), 0, -1, &rows));
      c->set_output(0, c->input(0));
      c->set_output(1, rows);
      c->set_output(2, rows);
      return OkStatus();
    });

REGISTER_OP("EngineLayerNormGrad")
    .Input("upstream: float")
    .Input("x: float")
    .Input("mean: float")
    .Input("rstd: float")
    .Input("gamma: float")
    .Output("x_grad: float")
    .Output("gamma_grad: float")
    .Output("beta_grad: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(1));
      c->set_output(1, c->input(4));
      c->set_output(2, c->input(4));
      return OkStatus();
    });

REGISTER_OP("EngineAddLayerNorm")
    .Input("x: T")         // [..., features]
    .Input("residual: R")  // x's shape
    .Input("gamma: float")
    .Input("beta: float")
    .Output("y: float")
    .Output("sum: float")   // x + residual
    .Output("mean: float")  // [...]
    .Output("rstd: float")  // [...]
    .Attr("T: {float, bfloat16}")
    .Attr("R: {float, bfloat16}")
    .Attr("epsilon: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle rows;
      TF_RETURN_IF_ERROR(c->Subshape(c->input(0), 0, -1, &rows));
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(0));
      c->set_output(2, rows);
      c->set_output(3, rows);
      return OkStatus();
    });

ENGINE_CLONES void ForwardRow(const float* __restrict x, const float* __restrict gamma, const float* __restrict beta,
                              float epsilon, float* __restrict y, float* mean_out, float* rstd_out, int64_t n) {
  const float mean = SumOfRow(x, n) / static_cast<float>(n);
  Lanes squares = {}, more_squares = {};  // two chains of additions (cpu_kernels.h: kLanes2)
  int64_t j = 0;
  for (; j + kLanes2 <= n; j += kLanes2) {
    const Lanes centered = LoadLanes(x + j) - mean, more_centered = LoadLanes(x + j + kLanes) - mean;
    squares += centered * centered;
    more_squares += more_centered * more_centered;
  }
  for (; j + kLanes <= n; j += kLanes) {
    const Lanes centered = LoadLanes(x + j) - mean;
    squares += centered * centered;
  }
  float square_total = SumOfLanes(squares + more_squares);
  for (; j < n; ++j) square_total += (x[j] - mean) * (x[j] - mean);
  const float rstd = 1.0f / std::sqrt(square_total / static_cast<float>(n) + epsilon);
  for (j = 0; j < n; ++j) {
    const float inverse = rstd * gamma[j];
    y[j] = x[j] * inverse + (beta[j] - mean * inverse);
  }
  *mean_out = mean;
  *rstd_out = rstd;
}

// Adds the row's dgamma and dbeta terms into `gamma_sums` and `beta_sums`; `scratch` holds 2n floats.
ENGINE_CLONES void BackwardRow(const float* __restrict dy, const float* __restrict x, float mean, float rstd,
                               const float* __restrict gamma, float* __restrict scratch, float* __restrict dx,
                               float* __restrict gamma_sums, float* __restrict beta_sums, int64_t n) {
  float* __restrict x_hat = scratch;
  float* __restrict g = scratch + n;
  for (int64_t j = 0; j < n; ++j) {
    x_hat[j] = (x[j] - mean) * rstd;
    g[j] = dy[j] * gamma[j];
  }
  Lanes g_sums = {}, g_x_hat_sums = {}, more_g_sums = {}, more_g_x_hat_sums = {};
  int64_t j = 0;
  for (; j + kLanes2 <= n; j += kLanes2) {
    const Lanes lanes_g = LoadLanes(g + j), more_lanes_g = LoadLanes(g + j + kLanes);
    g_sums += lanes_g;
    g_x_hat_sums += lanes_g * LoadLanes(x_hat + j);
    more_g_sums += more_lanes_g;
    more_g_x_hat_sums += more_lanes_g * LoadLanes(x_hat + j + kLanes);
  }
  for (; j + kLanes <= n; j += kLanes) {
    const Lanes lanes_g = LoadLanes(g + j);
    g_sums += lanes_g;
    g_x_hat_sums += lanes_g * LoadLanes(x_hat + j);
  }
  float g_total = SumOfLanes(g_sums + more_g_sums), g_x_hat_total = SumOfLanes(g_x_hat_sums + more_g_x_hat_sums);
  for (; j < n; ++j) {
    g_total += g[j];
    g_x_hat_total += g[j] * x_hat[j];
  }
  const float g_mean = g_total / static_cast<float>(n), g_x_hat_mean = g_x_hat_total / static_cast<float>(n);
  for (j = 0; j < n; ++j) {
    dx[j] = rstd * (g[j] - g_mean - x_hat[j] * g_x_hat_mean);
    gamma_sums[j] += dy[j] * x_hat[j];
    beta_sums[j] += dy[j];
  }
}

// Allocates y (output 0), mean and rstd (outputs mean_index, mean_index + 1) for x's shape; false, with the op
// failed, unless gamma and beta hold one value per feature.
bool AllocateForward(OpKernelContext* context, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                     int mean_index, Tensor** y, Tensor** mean, Tensor** rstd) {
  if (x.dims() < 1) {
    context->CtxFailure(errors::InvalidArgument("x must have a feature axis"));
    return false;
  }
  const int64_t n = x.dim_size(x.dims() - 1);
  if (gamma.NumElements() != n || beta.NumElements() != n) {
    context->CtxFailure(errors::InvalidArgument("gamma and beta must hold ", n, " values, got ",
                                                gamma.NumElements(), " and ", beta.NumElements()));
    return false;
  }
  TensorShape rows_shape = x.shape();
  rows_shape.RemoveLastDims(1);
  Status status = context->allocate_output(0, x.shape(), y);
  if (status.ok()) status = context->allocate_output(mean_index, rows_shape, mean);
  if (status.ok()) status = context->allocate_output(mean_index + 1, rows_shape, rstd);
  if (!status.ok()) context->CtxFailure(status);
  return status.ok();
}

// LayerNorm of each row into y, mean and rstd; `row_input(row)` gives the row's n float32 inputs (EngineAddLayerNorm
// writes the sum there first).
template <typename RowInput>
void NormalizeRows(OpKernelContext* context, int64_t rows, int64_t n, const float* gamma, const float* beta,
                   float epsilon, float* y, float* mean, float* rstd, RowInput row_input) {
  auto work = [&](int64_t first, int64_t end) {
    for (int64_t row = first; row < end; ++row)
      ForwardRow(row_input(row), gamma, beta, epsilon, y + row * n, mean + row, rstd + row, n);
  };
  auto* workers = context->device()->tensorflow_cpu_worker_threads();
  Shard(workers->num_threads, workers->workers, rows, 10 * n, work);
}

// Both forward ops: the epsilon attribute.
class ForwardOpBase : public OpKernel {
 public:
  explicit ForwardOpBase(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("epsilon", &epsilon_));
  }

 protected:
  float epsilon_;
};

class LayerNormOp : public ForwardOpBase {
 public:
  explicit LayerNormOp(OpKernelConstruction* context) : ForwardOpBase(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    Tensor *y = nullptr, *mean = nullptr, *rstd = nullptr;
    if (!AllocateForward(context, x, context->input(1), context->input(2), 1, &y, &mean, &rstd)) return;
    const int64_t n = x.dim_size(x.dims() - 1);
    if (x.NumElements() == 0) return;
    const float* x_data = x.flat<float>().data();
    NormalizeRows(context, x.NumElements() / n, n, context->input(1).flat<float>().data(),
                  context->input(2).flat<float>().data(), epsilon_, y->flat<float>().data(),
                  mean->flat<float>().data(), rstd->flat<float>().data(),
                  [&](int64_t row) { return x_data + row * n; });
  }
};

template <typename T, typename R>
class AddLayerNormOp : public ForwardOpBase {
 public:
  explicit AddLayerNormOp(OpKernelConstruction* context) : ForwardOpBase(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    const Tensor& residual = context->input(1);
    OP_REQUIRES(context, x.shape() == residual.shape(),
                errors::InvalidArgument("x and residual must have one shape, got ", x.shape().DebugString(),
                                        " and ", residual.shape().DebugString()));
    Tensor *y = nullptr, *sum = nullptr, *mean = nullptr, *rstd = nullptr;
    if (!AllocateForward(context, x, context->input(2), context->input(3), 2, &y, &mean, &rstd)) return;
    OP_REQUIRES_OK(context, context->allocate_output(1, x.shape(), &sum));
    const int64_t n = x.dim_size(x.dims() - 1);
    if (x.NumElements() == 0) return;
    const BitsOf<T>* x_data = reinterpret_cast<const BitsOf<T>*>(x.flat<T>().data());
    const BitsOf<R>* residual_data = reinterpret_cast<const BitsOf<R>*>(residual.flat<R>().data());
    float* sum_data = sum->flat<float>().data();
    NormalizeRows(context, x.NumElements() / n, n, context->input(2).flat<float>().data(),
                  context->input(3).flat<float>().data(), epsilon_, y->flat<float>().data(),
                  mean->flat<float>().data(), rstd->flat<float>().data(), [&](int64_t row) {
                    const BitsOf<T>* x_row = x_data + row * n;
                    const BitsOf<R>* residual_row = residual_data + row * n;
                    float* sum_row = sum_data + row * n;
                    for (int64_t j = 0; j < n; ++j) sum_row[j] = Widen(x_row[j]) + Widen(residual_row[j]);
                    return static_cast<const float*>(sum_row);
                  });
  }
};

class LayerNormGradOp : public OpKernel {
 public:
  explicit LayerNormGradOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& upstream = context->input(0);
    const Tensor& x = context->input(1);
    const Tensor& mean = context->input(2);
    const Tensor& rstd = context->input(3);
    const Tensor& gamma = context->input(4);
    OP_REQUIRES(context, x.dims() >= 1 && upstream.shape() == x.shape(),
                errors::InvalidArgument("upstream and x must have one shape, got ", upstream.shape().DebugString(),
                                        " and ", x.shape().DebugString()));
    const int64_t n = x.dim_size(x.dims() - 1);
    const int64_t rows = n == 0 ? 0 : x.NumElements() / n;
    OP_REQUIRES(context, gamma.NumElements() == n && mean.NumElements() == rows && rstd.NumElements() == rows,
                errors::InvalidArgument("gamma must hold ", n, " values and mean and rstd ", rows));
    Tensor *dx = nullptr, *dgamma = nullptr, *dbeta = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &dx));
    OP_REQUIRES_OK(context, context->allocate_output(1, gamma.shape(), &dgamma));
    OP_REQUIRES_OK(context, context->allocate_output(2, gamma.shape(), &dbeta));
    const float* dy_data = upstream.flat<float>().data();
    const float* x_data = x.flat<float>().data();
    const float* mean_data = mean.flat<float>().data();
    const float* rstd_data = rstd.flat<float>().data();
    const float* gamma_data = gamma.flat<float>().data();
    float* dx_data = dx->flat<float>().data();
    std::vector<float> totals(2 * n);  // dgamma's, then dbeta's
    SumColumnsInFixedChunks(context, rows, 2 * n, 20 * n, totals.data(),
                            [&](int64_t first_row, int64_t end_row, float* sums) {
                              std::vector<float> scratch(2 * n);
                              for (int64_t row = first_row; row < end_row; ++row)
                                BackwardRow(dy_data + row * n, x_data + row * n, mean_data[row], rstd_data[row],
                                            gamma_data, scratch.data(), dx_data + row * n, sums, sums + n, n);
                            });
    std::copy(totals.begin(), totals.begin() + n, dgamma->flat<float>().data());
    std::copy(totals.begin() + n, totals.end(), dbeta->flat<float>().data());
  }
};

REGISTER_KERNEL_BUILDER(Name("EngineLayerNorm").Device(DEVICE_CPU), LayerNormOp);
REGISTER_KERNEL_BUILDER(Name("EngineLayerNormGrad").Device(DEVICE_CPU), LayerNormGradOp);
#define ENGINE_REGISTER_ADD_LAYER_NORM(T, R)                                                                    \
  REGISTER_KERNEL_BUILDER(                                                                                      \
      Name("EngineAddLayerNorm").Device(DEVICE_CPU).TypeConstraint<T>("T").TypeConstraint<R>("R"),             \
      AddLayerNormOp<T, R>);
ENGINE_REGISTER_ADD_LAYER_NORM(float, float)
ENGINE_REGISTER_ADD_LAYER_NORM(float, bfloat16)
ENGINE_REGISTER_ADD_LAYER_NORM(bfloat16, float)
ENGINE_REGISTER_ADD_LAYER_NORM(bfloat16, bfloat16)

}  // namespace
}  // namespace tensorflow
