// Torch-facing CUDA entry points: check tensors, allocate outputs, call the C-ABI launchers of
// segment_sums_cuda.cu on the current CUDA stream of v_theta's device.
//
// Compiled into vidpo._C only when setup.py found a CUDA torch and nvcc (it then defines
// VIDPO_WITH_CUDA); in a CPU build this file is empty.
#ifdef VIDPO_WITH_CUDA

#include "segment_sums_ops.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "segment_sums.h"

namespace vidpo {
namespace {

constexpr const char* kSumsOp = "segment_sq_err_sums_cuda";
constexpr const char* kResidualOp = "segment_scaled_residual_cuda";

int launcher_dtype(at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? VIDPO_DTYPE_BFLOAT16 : VIDPO_DTYPE_FLOAT32;
}

VidpoSegmentShape launcher_shape(const SegmentInputs& in, int64_t num_segments) {
  VidpoSegmentShape shape;
  shape.batch = in.batch;
  shape.channels = in.channels;
  shape.frames = in.frames;
  shape.plane = in.plane;
  shape.noise_batch = in.from_noise ? in.noise_batch : 0;
  shape.num_segments = num_segments;
  shape.value_dtype = launcher_dtype(in.value_dtype);
  shape.target_dtype = launcher_dtype(in.target_dtype);
  return shape;
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

void check_launch(const char* op, cudaError_t status) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(status));
}

}  // namespace

at::Tensor segment_sq_err_sums_cuda(const at::Tensor& v_theta, const OptionalTensor& v_ref,
                                    const OptionalTensor& target, const OptionalTensor& x0,
                                    const OptionalTensor& noise, const at::Tensor& segment_ids,
                                    int64_t num_segments) {
  check_num_segments(kSumsOp, num_segments);
  const SegmentInputs in = check_segment_inputs(kSumsOp, v_theta, v_ref, target, x0, noise, segment_ids,
                                                c10::DeviceType::CUDA, /*allow_double=*/false);
  const c10::cuda::CUDAGuard device_guard(in.v_theta.device());
  const int num_values = in.has_ref ? 2 : 1;
  const VidpoSegmentShape shape = launcher_shape(in, num_segments);
  const auto float_options = in.v_theta.options().dtype(at::kFloat);
  at::Tensor out = allocate_output({num_values, in.batch, num_segments}, float_options);
  at::Tensor workspace = at::empty(
      {static_cast<int64_t>(vidpo_segment_sums_workspace_floats(&shape, num_values))}, float_options);
  check_launch(kSumsOp, vidpo_segment_sq_err_sums_cuda(
                            &shape, in.v_theta.data_ptr(), data_or_null(in.v_ref), data_or_null(in.target),
                            data_or_null(in.x0), data_or_null(in.noise), in.segment_ids.data_ptr<int64_t>(),
                            workspace.data_ptr<float>(), out.data_ptr<float>(),
                            c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor segment_scaled_residual_cuda(const at::Tensor& v_theta, const OptionalTensor& target,
                                        const OptionalTensor& x0, const OptionalTensor& noise,
                                        const at::Tensor& coef, const at::Tensor& segment_ids) {
  const SegmentInputs in = check_segment_inputs(kResidualOp, v_theta, std::nullopt, target, x0, noise,
                                                segment_ids, c10::DeviceType::CUDA, /*allow_double=*/false);
  const c10::cuda::CUDAGuard device_guard(in.v_theta.device());
  const at::Tensor coef_f32 = check_coef(kResidualOp, coef, in);
  const VidpoSegmentShape shape = launcher_shape(in, coef_f32.size(1));
  at::Tensor grad = allocate_output(in.v_theta.sizes(), in.v_theta.options());
  check_launch(kResidualOp, vidpo_segment_scaled_residual_cuda(
                                &shape, in.v_theta.data_ptr(), data_or_null(in.target), data_or_null(in.x0),
                                data_or_null(in.noise), coef_f32.data_ptr<float>(),
                                in.segment_ids.data_ptr<int64_t>(), grad.data_ptr(),
                                c10::cuda::getCurrentCUDAStream().stream()));
  return grad;
}

}  // namespace vidpo

#endif  // VIDPO_WITH_CUDA
