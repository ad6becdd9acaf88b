// C ABI of the CUDA launchers for the fused paired-loss primitives (DESIGN.md sections 1 and 4).
//
// This header includes no torch header on purpose: the .cu that implements it must compile with a
// bare nvcc (the CPU torch wheel lacks the CUDA-side torch headers), and the torch-facing binding
// (segment_sums_cuda_bind.cpp) checks tensors and passes raw pointers plus the current stream.
//
// Layout. Every value tensor is contiguous (N, C, T, H, W); the launchers see it as N*C*T "rows"
// (one (n, c, t) plane each) of `plane` = H*W contiguous elements. Row r has n = r / (C*T) and
// t = r % T. The noise tensor has `noise_batch` = M samples; tgt[n] = noise[n % M] - x0[n].
//
// segment_sq_err_sums:  out[k, n, s] = sum_{c, h, w, t : seg[t] == s} (v_k - tgt)^2  (fp32, (K, N, S)),
//                       v_0 = v_theta, v_1 = v_ref (K = 2 when v_ref is given, else 1).
// segment_scaled_residual: grad[n, c, t, h, w] = coef[n, seg[t]] * (v_theta - tgt)[n, c, t, h, w],
//                       stored in v_theta's dtype; frames with seg[t] outside [0, S) get 0.
// Both compute in fp32; the sums are deterministic (fixed tiling, two-stage reduction, no atomics).
#ifndef VIDPO_CSRC_SEGMENT_SUMS_H_
#define VIDPO_CSRC_SEGMENT_SUMS_H_

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types the CUDA kernels read and write.
enum VidpoDtype { VIDPO_DTYPE_FLOAT32 = 0, VIDPO_DTYPE_BFLOAT16 = 1 };

// Sizes and element types of one call; all counts are in elements.
typedef struct VidpoSegmentShape {
  int64_t batch;        // N
  int64_t channels;     // C
  int64_t frames;       // T (latent frames); segment_ids has T entries
  int64_t plane;        // H * W
  int64_t noise_batch;  // M (== N or N / 2) when the target is noise - x0; ignored otherwise
  int64_t num_segments; // S
  int value_dtype;      // VidpoDtype of v_theta, v_ref and grad
  int target_dtype;     // VidpoDtype of target, or of x0 and noise
} VidpoSegmentShape;

// Number of fp32 scratch elements segment_sq_err_sums needs for `num_values` (K) value tensors;
// an upper bound over every tiling the launcher may pick for this shape.
size_t vidpo_segment_sums_workspace_floats(const VidpoSegmentShape* shape, int num_values);

// out: (K, N, S) fp32. v_ref may be NULL (K = 1). Exactly one of target or (x0, noise) is non-NULL.
// segment_ids: T int64 values on the device. workspace: see vidpo_segment_sums_workspace_floats.
cudaError_t vidpo_segment_sq_err_sums_cuda(const VidpoSegmentShape* shape, const void* v_theta,
                                           const void* v_ref, const void* target, const void* x0,
                                           const void* noise, const int64_t* segment_ids,
                                           float* workspace, float* out, cudaStream_t stream);

// grad: like v_theta. coef: (N, S) fp32. Exactly one of target or (x0, noise) is non-NULL.
cudaError_t vidpo_segment_scaled_residual_cuda(const VidpoSegmentShape* shape, const void* v_theta,
                                               const void* target, const void* x0, const void* noise,
                                               const float* coef, const int64_t* segment_ids,
                                               void* grad, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // VIDPO_CSRC_SEGMENT_SUMS_H_
