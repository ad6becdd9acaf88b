// CUDA kernels of the fused paired-loss primitives (formulas and layout in segment_sums.h).
//
// No torch header here (DESIGN.md section 4): segment_sums_cuda_bind.cpp checks the tensors and calls
// the C-ABI launchers below with raw pointers and the current stream.
//
// Tiling. A value tensor is N*C*T rows (one (n, c, t) plane of H*W contiguous elements each); every
// row belongs to one sample n and one segment seg[t]. A thread block owns one tile = a chunk of one
// row, so no per-element index arithmetic is needed and a tile's partial sum has a single (n, s).
// Loads are 16-byte vectors (8 bf16, or 2 x float4 of fp32) when H*W % 8 == 0 and every pointer is
// 16-byte aligned, scalar otherwise. The block size shrinks for short rows so threads stay busy.
//
// Forward (deterministic, no atomics): stage 1 writes one fp32 partial per (k, tile) after a
// warp-shuffle + shared-memory block reduction; stage 2 gives one warp to each (k, n, s) and adds the
// partials of its rows in a fixed order in fp64. The tiling depends only on the shape and alignment,
// so two runs of the same call are bit-identical on any GPU.
// Backward: one pass over the same tiles, reading v_theta and the target once, writing grad once.
#include "segment_sums.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <stdint.h>

namespace {

constexpr int kMaxBlock = 256;
constexpr int kMinBlock = 32;
// Vectors per thread per tile. Two 16-byte loads per tensor per thread keep enough bytes in flight
// for HBM3 at the occupancy these kernels reach; more would only cost registers.
constexpr int kUnroll = 2;
constexpr int kVec = 8;

struct Tiling {
  int block;              // threads per block
  int64_t tiles_per_row;  // blocks per row
};

// Fewest tiles of at most kMaxBlock * kUnroll vectors per row, then the smallest whole-warp block
// that covers an equal share: a 60x104 bf16 plane (780 vectors) gets 2 tiles of 224 threads instead
// of a full tile and a half-idle one.
Tiling plan_tiling(int64_t plane, int vec) {
  const int64_t vectors = plane / vec;
  const int64_t max_per_tile = static_cast<int64_t>(kMaxBlock) * kUnroll;
  const int64_t tiles = (vectors + max_per_tile - 1) / max_per_tile;
  const int64_t per_tile = tiles > 0 ? (vectors + tiles - 1) / tiles : 0;
  const int64_t threads = (per_tile + kUnroll - 1) / kUnroll;
  int64_t block = (threads + 31) / 32 * 32;
  block = block < kMinBlock ? kMinBlock : (block > kMaxBlock ? kMaxBlock : block);
  return {static_cast<int>(block), tiles};
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---------------------------------------------------------------------------------------------------
// Element and vector conversions (compute is fp32).

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T, int VEC>
struct VecIO;

template <typename T>
struct VecIO<T, 1> {
  static __device__ __forceinline__ void load(const T* p, float* out) { out[0] = to_float(p[0]); }
  static __device__ __forceinline__ void store(T* p, const float* v) { p[0] = from_float<T>(v[0]); }
};

template <>
struct VecIO<float, 8> {
  static __device__ __forceinline__ void load(const float* p, float* out) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
  }
  static __device__ __forceinline__ void store(float* p, const float* v) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
};

template <>
struct VecIO<__nv_bfloat16, 8> {
  static __device__ __forceinline__ void load(const __nv_bfloat16* p, float* out) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(pairs[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, const float* v) {
    uint4 raw;
    __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) pairs[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
};

// ---------------------------------------------------------------------------------------------------
// Reductions (fixed shuffle trees, so the result does not depend on timing).

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums each of v[0..K) over the block; the result is valid in thread 0.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K]) {
  __shared__ float warp_totals[K][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = warp_sum(v[k]);
    if (lane == 0) warp_totals[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < num_warps ? warp_totals[k][lane] : 0.0f);
  }
}

// ---------------------------------------------------------------------------------------------------
// Kernels.

template <typename TV, typename TT>
struct RowArgs {
  const TV* v_theta;
  const TV* v_ref;
  const TT* target;
  const TT* x0;
  const TT* noise;
  int64_t rows;             // N * C * T
  int64_t rows_per_sample;  // C * T
  int64_t frames;           // T
  int64_t plane;            // H * W
  int64_t noise_batch;      // M
  int64_t tiles_per_row;
};

// Offset of the noise row that pairs with value row `row`: sample n % M, same (c, t).
template <typename TV, typename TT>
__device__ __forceinline__ int64_t noise_row_offset(const RowArgs<TV, TT>& a, int64_t row) {
  const int64_t n = row / a.rows_per_sample;
  return ((n % a.noise_batch) * a.rows_per_sample + (row - n * a.rows_per_sample)) * a.plane;
}

// g[0..VEC) = tgt at vector index v of the row (target, or noise - x0).
template <typename TT, int VEC, bool FROM_NOISE>
__device__ __forceinline__ void load_target(const TT* target, const TT* x0, const TT* noise, int64_t v,
                                            float* g) {
  if constexpr (FROM_NOISE) {
    float x[VEC];
    VecIO<TT, VEC>::load(noise + v * VEC, g);
    VecIO<TT, VEC>::load(x0 + v * VEC, x);
#pragma unroll
    for (int j = 0; j < VEC; ++j) g[j] -= x[j];
  } else {
    VecIO<TT, VEC>::load(target + v * VEC, g);
  }
}

// Stage 1: partials[k * rows * tiles + tile] = sum over the tile of (v_k - tgt)^2.
template <typename TV, typename TT, int VEC, bool HAS_REF, bool FROM_NOISE>
__global__ void __launch_bounds__(kMaxBlock) sq_err_tiles_kernel(const RowArgs<TV, TT> a, float* partials) {
  const int64_t tile = blockIdx.x;
  const int64_t row = tile / a.tiles_per_row;
  const int64_t chunk = tile - row * a.tiles_per_row;
  const int64_t offset = row * a.plane;
  const int64_t vectors = a.plane / VEC;
  const TV* vt = a.v_theta + offset;
  const TV* vr = HAS_REF ? a.v_ref + offset : nullptr;
  const TT* target = FROM_NOISE ? nullptr : a.target + offset;
  const TT* x0 = FROM_NOISE ? a.x0 + offset : nullptr;
  const TT* noise = FROM_NOISE ? a.noise + noise_row_offset(a, row) : nullptr;

  float acc[2] = {0.0f, 0.0f};
  const int64_t first = chunk * static_cast<int64_t>(blockDim.x) * kUnroll + threadIdx.x;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t v = first + static_cast<int64_t>(u) * blockDim.x;
    if (v < vectors) {
      float g[VEC], theta[VEC];
      load_target<TT, VEC, FROM_NOISE>(target, x0, noise, v, g);
      VecIO<TV, VEC>::load(vt + v * VEC, theta);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = theta[j] - g[j];
        acc[0] = fmaf(d, d, acc[0]);
      }
      if constexpr (HAS_REF) {
        float ref[VEC];
        VecIO<TV, VEC>::load(vr + v * VEC, ref);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = ref[j] - g[j];
          acc[1] = fmaf(d, d, acc[1]);
        }
      }
    }
  }
  block_sum<2>(acc);
  if (threadIdx.x == 0) {
    partials[tile] = acc[0];
    if (HAS_REF) partials[a.rows * a.tiles_per_row + tile] = acc[1];
  }
}

// Stage 2: one warp per (k, n, s); out[(k * N + n) * S + s] = fp64 sum of the partials of the rows
// (c, t) of sample n with seg[t] == s, visited in a fixed order.
__global__ void combine_segments_kernel(const float* partials, const int64_t* segment_ids, float* out,
                                        int64_t batch, int64_t rows, int64_t rows_per_sample,
                                        int64_t frames, int64_t tiles_per_row, int64_t num_segments) {
  const int64_t index = blockIdx.x;
  const int64_t s = index % num_segments;
  const int64_t n = (index / num_segments) % batch;
  const int64_t k = index / (num_segments * batch);
  const float* sample = partials + (k * rows + n * rows_per_sample) * tiles_per_row;
  const int64_t count = rows_per_sample * tiles_per_row;  // entry j is (c * T + t) * tiles + chunk
  double acc = 0.0;
  for (int64_t j = threadIdx.x; j < count; j += 32) {
    const int64_t t = (j / tiles_per_row) % frames;
    if (segment_ids[t] == s) acc += static_cast<double>(sample[j]);
  }
  acc = warp_sum(acc);
  if (threadIdx.x == 0) out[index] = static_cast<float>(acc);
}

// grad = coef[n, seg[t]] * (v_theta - tgt) over one tile; frames in no segment get 0.
template <typename TV, typename TT, int VEC, bool FROM_NOISE>
__global__ void __launch_bounds__(kMaxBlock)
    scaled_residual_kernel(const RowArgs<TV, TT> a, const float* coef, const int64_t* segment_ids,
                           int64_t num_segments, TV* grad) {
  const int64_t tile = blockIdx.x;
  const int64_t row = tile / a.tiles_per_row;
  const int64_t chunk = tile - row * a.tiles_per_row;
  const int64_t offset = row * a.plane;
  const int64_t vectors = a.plane / VEC;
  const int64_t segment = segment_ids[row % a.frames];
  const bool in_segment = segment >= 0 && segment < num_segments;
  const float scale = in_segment ? coef[(row / a.rows_per_sample) * num_segments + segment] : 0.0f;
  const TV* vt = a.v_theta + offset;
  const TT* target = FROM_NOISE ? nullptr : a.target + offset;
  const TT* x0 = FROM_NOISE ? a.x0 + offset : nullptr;
  const TT* noise = FROM_NOISE ? a.noise + noise_row_offset(a, row) : nullptr;
  TV* out = grad + offset;

  const int64_t first = chunk * static_cast<int64_t>(blockDim.x) * kUnroll + threadIdx.x;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t v = first + static_cast<int64_t>(u) * blockDim.x;
    if (v < vectors) {
      float result[VEC];
      if (in_segment) {
        float g[VEC];
        load_target<TT, VEC, FROM_NOISE>(target, x0, noise, v, g);
        VecIO<TV, VEC>::load(vt + v * VEC, result);
#pragma unroll
        for (int j = 0; j < VEC; ++j) result[j] = scale * (result[j] - g[j]);
      } else {
        // Not 0 * residual: an inf/nan residual of an excluded frame must not leak into grad.
#pragma unroll
        for (int j = 0; j < VEC; ++j) result[j] = 0.0f;
      }
      VecIO<TV, VEC>::store(out + v * VEC, result);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Host-side dispatch.

template <typename T>
struct Tag {
  using type = T;
};

// Calls fn(Tag<TV>{}, Tag<TT>{}) for the two dtype flags.
template <typename Fn>
cudaError_t dispatch_dtypes(int value_dtype, int target_dtype, Fn&& fn) {
  const bool value_bf16 = value_dtype == VIDPO_DTYPE_BFLOAT16;
  const bool target_bf16 = target_dtype == VIDPO_DTYPE_BFLOAT16;
  if ((!value_bf16 && value_dtype != VIDPO_DTYPE_FLOAT32) ||
      (!target_bf16 && target_dtype != VIDPO_DTYPE_FLOAT32)) {
    return cudaErrorInvalidValue;
  }
  if (value_bf16) {
    return target_bf16 ? fn(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{}) : fn(Tag<__nv_bfloat16>{}, Tag<float>{});
  }
  return target_bf16 ? fn(Tag<float>{}, Tag<__nv_bfloat16>{}) : fn(Tag<float>{}, Tag<float>{});
}

template <typename TV, typename TT>
RowArgs<TV, TT> make_row_args(const VidpoSegmentShape& s, const void* v_theta, const void* v_ref,
                              const void* target, const void* x0, const void* noise, int64_t tiles) {
  RowArgs<TV, TT> a;
  a.v_theta = static_cast<const TV*>(v_theta);
  a.v_ref = static_cast<const TV*>(v_ref);
  a.target = static_cast<const TT*>(target);
  a.x0 = static_cast<const TT*>(x0);
  a.noise = static_cast<const TT*>(noise);
  a.rows = s.batch * s.channels * s.frames;
  a.rows_per_sample = s.channels * s.frames;
  a.frames = s.frames;
  a.plane = s.plane;
  a.noise_batch = s.noise_batch > 0 ? s.noise_batch : 1;
  a.tiles_per_row = tiles;
  return a;
}

bool grid_fits(int64_t blocks) { return blocks <= 0x7FFFFFFFLL; }

template <typename TV, typename TT, int VEC, bool HAS_REF, bool FROM_NOISE>
void launch_sq_err_tiles(const RowArgs<TV, TT>& a, int block, float* partials, cudaStream_t stream) {
  const int64_t blocks = a.rows * a.tiles_per_row;
  sq_err_tiles_kernel<TV, TT, VEC, HAS_REF, FROM_NOISE>
      <<<static_cast<unsigned int>(blocks), block, 0, stream>>>(a, partials);
}

template <typename TV, typename TT, int VEC>
void launch_sq_err_tiles_flags(const RowArgs<TV, TT>& a, bool has_ref, bool from_noise, int block,
                               float* partials, cudaStream_t stream) {
  if (has_ref) {
    if (from_noise) launch_sq_err_tiles<TV, TT, VEC, true, true>(a, block, partials, stream);
    else launch_sq_err_tiles<TV, TT, VEC, true, false>(a, block, partials, stream);
  } else {
    if (from_noise) launch_sq_err_tiles<TV, TT, VEC, false, true>(a, block, partials, stream);
    else launch_sq_err_tiles<TV, TT, VEC, false, false>(a, block, partials, stream);
  }
}

template <typename TV, typename TT, int VEC>
void launch_scaled_residual(const RowArgs<TV, TT>& a, bool from_noise, int block, const float* coef,
                            const int64_t* segment_ids, int64_t num_segments, TV* grad, cudaStream_t stream) {
  const unsigned int grid = static_cast<unsigned int>(a.rows * a.tiles_per_row);
  if (from_noise) {
    scaled_residual_kernel<TV, TT, VEC, true><<<grid, block, 0, stream>>>(a, coef, segment_ids, num_segments, grad);
  } else {
    scaled_residual_kernel<TV, TT, VEC, false><<<grid, block, 0, stream>>>(a, coef, segment_ids, num_segments, grad);
  }
}

}  // namespace

extern "C" size_t vidpo_segment_sums_workspace_floats(const VidpoSegmentShape* shape, int num_values) {
  // Scalar tiling has the most tiles per row, so it bounds every tiling the launcher may choose.
  const Tiling worst = plan_tiling(shape->plane, 1);
  const int64_t rows = shape->batch * shape->channels * shape->frames;
  const int64_t floats = static_cast<int64_t>(num_values) * rows * worst.tiles_per_row;
  return static_cast<size_t>(floats > 0 ? floats : 1);
}

extern "C" cudaError_t vidpo_segment_sq_err_sums_cuda(const VidpoSegmentShape* shape, const void* v_theta,
                                                      const void* v_ref, const void* target,
                                                      const void* x0, const void* noise,
                                                      const int64_t* segment_ids, float* workspace,
                                                      float* out, cudaStream_t stream) {
  const VidpoSegmentShape& s = *shape;
  const bool has_ref = v_ref != nullptr;
  const bool from_noise = target == nullptr;
  if (from_noise && (x0 == nullptr || noise == nullptr)) return cudaErrorInvalidValue;
  if (s.num_segments < 1) return cudaErrorInvalidValue;
  const int64_t num_values = has_ref ? 2 : 1;
  const int64_t outputs = num_values * s.batch * s.num_segments;
  if (outputs == 0) return cudaSuccess;

  const bool vectorized = s.plane % kVec == 0 && aligned16(v_theta) && aligned16(v_ref) &&
                          aligned16(target) && aligned16(x0) && aligned16(noise);
  const Tiling tiling = plan_tiling(s.plane, vectorized ? kVec : 1);
  const int64_t rows = s.batch * s.channels * s.frames;
  if (!grid_fits(rows * tiling.tiles_per_row) || !grid_fits(outputs)) return cudaErrorInvalidConfiguration;

  if (rows * tiling.tiles_per_row > 0) {
    const cudaError_t status = dispatch_dtypes(s.value_dtype, s.target_dtype, [&](auto tv, auto tt) {
      using TV = typename decltype(tv)::type;
      using TT = typename decltype(tt)::type;
      const RowArgs<TV, TT> a = make_row_args<TV, TT>(s, v_theta, v_ref, target, x0, noise,
                                                      tiling.tiles_per_row);
      if (vectorized) {
        launch_sq_err_tiles_flags<TV, TT, kVec>(a, has_ref, from_noise, tiling.block, workspace, stream);
      } else {
        launch_sq_err_tiles_flags<TV, TT, 1>(a, has_ref, from_noise, tiling.block, workspace, stream);
      }
      return cudaGetLastError();
    });
    if (status != cudaSuccess) return status;
  }
  combine_segments_kernel<<<static_cast<unsigned int>(outputs), 32, 0, stream>>>(
      workspace, segment_ids, out, s.batch, rows, s.channels * s.frames, s.frames, tiling.tiles_per_row,
      s.num_segments);
  return cudaGetLastError();
}

extern "C" cudaError_t vidpo_segment_scaled_residual_cuda(const VidpoSegmentShape* shape,
                                                          const void* v_theta, const void* target,
                                                          const void* x0, const void* noise,
                                                          const float* coef, const int64_t* segment_ids,
                                                          void* grad, cudaStream_t stream) {
  const VidpoSegmentShape& s = *shape;
  const bool from_noise = target == nullptr;
  if (from_noise && (x0 == nullptr || noise == nullptr)) return cudaErrorInvalidValue;
  if (s.num_segments < 1) return cudaErrorInvalidValue;
  const bool vectorized = s.plane % kVec == 0 && aligned16(v_theta) && aligned16(target) &&
                          aligned16(x0) && aligned16(noise) && aligned16(grad);
  const Tiling tiling = plan_tiling(s.plane, vectorized ? kVec : 1);
  const int64_t blocks = s.batch * s.channels * s.frames * tiling.tiles_per_row;
  if (blocks == 0) return cudaSuccess;
  if (!grid_fits(blocks)) return cudaErrorInvalidConfiguration;

  return dispatch_dtypes(s.value_dtype, s.target_dtype, [&](auto tv, auto tt) {
    using TV = typename decltype(tv)::type;
    using TT = typename decltype(tt)::type;
    const RowArgs<TV, TT> a = make_row_args<TV, TT>(s, v_theta, nullptr, target, x0, noise,
                                                    tiling.tiles_per_row);
    TV* out = static_cast<TV*>(grad);
    if (vectorized) {
      launch_scaled_residual<TV, TT, kVec>(a, from_noise, tiling.block, coef, segment_ids, s.num_segments, out,
                                           stream);
    } else {
      launch_scaled_residual<TV, TT, 1>(a, from_noise, tiling.block, coef, segment_ids, s.num_segments, out,
                                        stream);
    }
    return cudaGetLastError();
  });
}
