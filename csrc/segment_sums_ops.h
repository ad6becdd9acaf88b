// Torch-facing entry points of the fused paired-loss primitives (bound into vidpo._C by bindings.cpp).
//
//   segment_sq_err_sums_*(v_theta, v_ref?, target?, x0?, noise?, segment_ids, num_segments) -> (K, N, S)
//       out[k, n, s] = sum over c, h, w and frames t with segment_ids[t] == s of (v_k - tgt)^2,
//       v_0 = v_theta, v_1 = v_ref; tgt[n] = target[n] or noise[n % M] - x0[n].
//       fp32 output (float64 on the CPU when the inputs are float64).
//   segment_scaled_residual_*(v_theta, target?, x0?, noise?, coef, segment_ids) -> like v_theta
//       grad[n, c, t, h, w] = coef[n, segment_ids[t]] * (v_theta - tgt)[n, c, t, h, w].
//
// Frames whose segment id lies outside [0, S) belong to no segment: they add nothing to the sums and
// get a zero gradient. Inputs that are not contiguous are made contiguous (a copy); outputs are
// always contiguous.
#ifndef VIDPO_CSRC_SEGMENT_SUMS_OPS_H_
#define VIDPO_CSRC_SEGMENT_SUMS_OPS_H_

#include <ATen/core/Tensor.h>

#include <optional>

namespace vidpo {

using OptionalTensor = std::optional<at::Tensor>;

// Checked, contiguous views of one call's inputs and the sizes the kernels need.
struct SegmentInputs {
  at::Tensor v_theta;      // (N, C, T, H, W)
  at::Tensor v_ref;        // same, or undefined
  at::Tensor target;       // same, or undefined (then x0 and noise are defined)
  at::Tensor x0;           // (N, C, T, H, W) or undefined
  at::Tensor noise;        // (M, C, T, H, W) or undefined
  at::Tensor segment_ids;  // (T,) int64, on segment_ids_device
  int64_t batch = 0, channels = 0, frames = 0, plane = 0, noise_batch = 0;
  bool has_ref = false;
  bool from_noise = false;
  at::ScalarType value_dtype = at::kFloat;
  at::ScalarType target_dtype = at::kFloat;
};

// Validates shapes, dtypes and devices; every message starts with `op`. The value tensors must be on
// `device_type`; float64 is accepted only when `allow_double` (CPU). segment_ids is returned as int64
// on `device_type` (moved there when given on the CPU).
SegmentInputs check_segment_inputs(const char* op, const at::Tensor& v_theta,
                                   const OptionalTensor& v_ref, const OptionalTensor& target,
                                   const OptionalTensor& x0, const OptionalTensor& noise,
                                   const at::Tensor& segment_ids, c10::DeviceType device_type,
                                   bool allow_double);

// coef (N, S) converted to the compute dtype (fp32, or fp64 for float64 values) and made contiguous.
at::Tensor check_coef(const char* op, const at::Tensor& coef, const SegmentInputs& in);

// at::empty, or a NaN-filled tensor when the environment sets VIDPO_POISON_OUTPUTS=1, so a test sees
// any element a kernel failed to write (the Triton backend honours the same variable).
at::Tensor allocate_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Checks num_segments >= 1 and returns it.
int64_t check_num_segments(const char* op, int64_t num_segments);

at::Tensor segment_sq_err_sums_cpu(const at::Tensor& v_theta, const OptionalTensor& v_ref,
                                   const OptionalTensor& target, const OptionalTensor& x0,
                                   const OptionalTensor& noise, const at::Tensor& segment_ids,
                                   int64_t num_segments);

at::Tensor segment_scaled_residual_cpu(const at::Tensor& v_theta, const OptionalTensor& target,
                                       const OptionalTensor& x0, const OptionalTensor& noise,
                                       const at::Tensor& coef, const at::Tensor& segment_ids);

#ifdef VIDPO_WITH_CUDA
at::Tensor segment_sq_err_sums_cuda(const at::Tensor& v_theta, const OptionalTensor& v_ref,
                                    const OptionalTensor& target, const OptionalTensor& x0,
                                    const OptionalTensor& noise, const at::Tensor& segment_ids,
                                    int64_t num_segments);

at::Tensor segment_scaled_residual_cuda(const at::Tensor& v_theta, const OptionalTensor& target,
                                        const OptionalTensor& x0, const OptionalTensor& noise,
                                        const at::Tensor& coef, const at::Tensor& segment_ids);
#endif

}  // namespace vidpo

#endif  // VIDPO_CSRC_SEGMENT_SUMS_OPS_H_
