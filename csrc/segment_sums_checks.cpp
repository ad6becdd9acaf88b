// Input validation shared by the CPU and CUDA bindings of the paired-loss primitives.
//
// The kernels index raw pointers, so everything they assume is checked here once, with messages that
// name the op and the argument: 5-D (N, C, T, H, W) values, matching shapes, one target form, supported
// dtypes, one device, and a segment id per latent frame.
#include "segment_sums_ops.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

namespace vidpo {
namespace {

bool is_supported_dtype(at::ScalarType dtype, bool allow_double) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || (allow_double && dtype == at::kDouble);
}

std::string supported_dtypes(bool allow_double) {
  return allow_double ? "float32, bfloat16 or float64" : "float32 or bfloat16";
}

void check_value_tensor(const char* op, const char* name, const at::Tensor& t,
                        c10::DeviceType device_type, bool allow_double) {
  TORCH_CHECK(t.dim() == 5, op, ": ", name, " must be 5-D (N, C, T, H, W), got shape ", t.sizes());
  TORCH_CHECK(t.device().type() == device_type, op, ": ", name, " must be on ",
              c10::DeviceTypeName(device_type), ", got ", t.device());
  TORCH_CHECK(is_supported_dtype(t.scalar_type(), allow_double), op, ": ", name, " must be ",
              supported_dtypes(allow_double), ", got ", t.scalar_type());
}

void check_same_shape(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have v_theta's shape ", ref.sizes(),
              ", got ", t.sizes());
}

}  // namespace

SegmentInputs check_segment_inputs(const char* op, const at::Tensor& v_theta,
                                   const OptionalTensor& v_ref, const OptionalTensor& target,
                                   const OptionalTensor& x0, const OptionalTensor& noise,
                                   const at::Tensor& segment_ids, c10::DeviceType device_type,
                                   bool allow_double) {
  SegmentInputs in;
  check_value_tensor(op, "v_theta", v_theta, device_type, allow_double);
  in.v_theta = v_theta.contiguous();
  in.value_dtype = v_theta.scalar_type();
  in.batch = v_theta.size(0);
  in.channels = v_theta.size(1);
  in.frames = v_theta.size(2);
  in.plane = v_theta.size(3) * v_theta.size(4);

  if (v_ref.has_value() && v_ref->defined()) {
    check_value_tensor(op, "v_ref", *v_ref, device_type, allow_double);
    check_same_shape(op, "v_ref", *v_ref, v_theta);
    TORCH_CHECK(v_ref->scalar_type() == in.value_dtype, op, ": v_ref must have v_theta's dtype ",
                in.value_dtype, ", got ", v_ref->scalar_type());
    TORCH_CHECK(v_ref->device() == v_theta.device(), op, ": v_ref is on ", v_ref->device(),
                " but v_theta is on ", v_theta.device());
    in.v_ref = v_ref->contiguous();
    in.has_ref = true;
  }

  const bool has_target = target.has_value() && target->defined();
  const bool has_x0 = x0.has_value() && x0->defined();
  const bool has_noise = noise.has_value() && noise->defined();
  TORCH_CHECK(has_target != (has_x0 || has_noise), op,
              ": give either target or (x0 and noise), not both and not neither");
  TORCH_CHECK(has_target || (has_x0 && has_noise), op,
              ": the velocity target needs both x0 and noise (tgt = noise - x0)");
  if (has_target) {
    check_value_tensor(op, "target", *target, device_type, allow_double);
    check_same_shape(op, "target", *target, v_theta);
    TORCH_CHECK(target->device() == v_theta.device(), op, ": target is on ", target->device(),
                " but v_theta is on ", v_theta.device());
    in.target = target->contiguous();
    in.target_dtype = target->scalar_type();
  } else {
    check_value_tensor(op, "x0", *x0, device_type, allow_double);
    check_value_tensor(op, "noise", *noise, device_type, allow_double);
    check_same_shape(op, "x0", *x0, v_theta);
    TORCH_CHECK(x0->device() == v_theta.device() && noise->device() == v_theta.device(), op,
                ": x0 and noise must be on v_theta's device ", v_theta.device());
    TORCH_CHECK(x0->scalar_type() == noise->scalar_type(), op,
                ": x0 and noise must share one dtype, got ", x0->scalar_type(), " and ",
                noise->scalar_type());
    TORCH_CHECK(noise->sizes().slice(1) == v_theta.sizes().slice(1), op,
                ": noise must be (M, C, T, H, W) with v_theta's C, T, H, W ", v_theta.sizes().slice(1),
                ", got ", noise->sizes());
    const int64_t m = noise->size(0);
    TORCH_CHECK(m == in.batch || (m > 0 && 2 * m == in.batch), op,
                ": noise batch M must equal N or N / 2 (one noise per pair), got M = ", m, ", N = ",
                in.batch);
    in.x0 = x0->contiguous();
    in.noise = noise->contiguous();
    in.noise_batch = m;
    in.from_noise = true;
    in.target_dtype = x0->scalar_type();
  }
  TORCH_CHECK((in.value_dtype == at::kDouble) == (in.target_dtype == at::kDouble), op,
              ": float64 inputs must all be float64, got values ", in.value_dtype, " and target ",
              in.target_dtype);

  TORCH_CHECK(segment_ids.dim() == 1 && segment_ids.size(0) == in.frames, op,
              ": segment_ids must be 1-D with one entry per latent frame (T = ", in.frames,
              "), got shape ", segment_ids.sizes());
  TORCH_CHECK(at::isIntegralType(segment_ids.scalar_type(), /*includeBool=*/false), op,
              ": segment_ids must be an integer tensor, got ", segment_ids.scalar_type());
  TORCH_CHECK(segment_ids.device().type() == device_type || segment_ids.device().is_cpu(), op,
              ": segment_ids must be on the CPU or on v_theta's device, got ", segment_ids.device());
  in.segment_ids = segment_ids.to(v_theta.device(), at::kLong).contiguous();
  return in;
}

at::Tensor check_coef(const char* op, const at::Tensor& coef, const SegmentInputs& in) {
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == in.batch && coef.size(1) >= 1, op,
              ": coef must be (N, S) with N = ", in.batch, " and S >= 1, got shape ", coef.sizes());
  TORCH_CHECK(coef.device() == in.v_theta.device(), op, ": coef is on ", coef.device(),
              " but v_theta is on ", in.v_theta.device());
  TORCH_CHECK(at::isFloatingType(coef.scalar_type()), op, ": coef must be floating point, got ",
              coef.scalar_type());
  const auto compute_dtype = in.value_dtype == at::kDouble ? at::kDouble : at::kFloat;
  return coef.to(compute_dtype).contiguous();
}

at::Tensor allocate_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  // Read per call (a getenv is cheap next to the kernels) so tests can flip it at run time.
  const char* poison = std::getenv("VIDPO_POISON_OUTPUTS");
  if (poison != nullptr && std::strcmp(poison, "1") == 0) {
    return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  }
  return at::empty(sizes, options);
}

int64_t check_num_segments(const char* op, int64_t num_segments) {
  TORCH_CHECK(num_segments >= 1, op, ": num_segments must be >= 1, got ", num_segments);
  return num_segments;
}

}  // namespace vidpo
