// OpenMP CPU kernels of the fused paired-loss primitives (formulas in segment_sums_ops.h).
//
// Work unit: one (n, c, t) plane of H*W contiguous elements ("row"). The forward reads v_theta,
// v_ref and the target (or x0 and noise) of a row exactly once, computing both residuals in the same
// pass, and stores the row's two sums; a fixed-order combine then adds rows into (K, N, S). Each row's
// sum depends only on the row, so results are bit-identical for any thread count or schedule.
//
// The inner loop over the plane is an `omp simd` reduction (AVX2 / AVX-512 with -march=native);
// bfloat16 is widened to fp32 with a 16-bit shift and narrowed with round-to-nearest-even (the same
// rounding as torch's .to(torch.bfloat16)), written as plain integer code so it vectorises.
// Accumulation is fp32 inside chunks of kChunk elements and fp64 across chunks and rows; float64
// inputs (used by gradcheck) compute in fp64 throughout.
#include "segment_sums_ops.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace vidpo {
namespace {

constexpr const char* kSumsOp = "segment_sq_err_sums_cpu";
constexpr const char* kResidualOp = "segment_scaled_residual_cpu";

// fp32 partial sums cover at most this many elements before they are folded into fp64, which bounds
// the rounding error of very large planes without slowing the common H*W <= a few thousand case.
constexpr int64_t kChunk = 4096;

// Storage type -> raw element type and conversions to / from the compute type.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using raw_t = float;
  static inline float load(float x) { return x; }
  static inline float store(float x) { return x; }
};

template <>
struct Elem<double> {
  using raw_t = double;
  static inline double load(double x) { return x; }
  static inline double store(double x) { return x; }
};

template <>
struct Elem<c10::BFloat16> {
  using raw_t = uint16_t;
  static inline float load(uint16_t bits) {
    const uint32_t widened = static_cast<uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &widened, sizeof(value));
    return value;
  }
  static inline uint16_t store(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    return is_nan ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
  }
};

template <typename T>
using raw_t = typename Elem<T>::raw_t;

// fp64 only when the values are fp64 (the checks forbid mixing fp64 with other dtypes).
template <typename TV>
using compute_t = std::conditional_t<std::is_same_v<TV, double>, double, float>;

template <typename T>
const raw_t<T>* raw_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const raw_t<T>*>(t.data_ptr()) : nullptr;
}

// Calls fn(TV{}, TT{}) with the storage types of the values and of the target.
template <typename Fn>
void dispatch_dtypes(const char* op, at::ScalarType value_dtype, at::ScalarType target_dtype, Fn&& fn) {
  auto with_target = [&](auto value_tag) {
    switch (target_dtype) {
      case at::kFloat: return fn(value_tag, float{});
      case at::kBFloat16: return fn(value_tag, c10::BFloat16{});
      case at::kDouble: return fn(value_tag, double{});
      default: TORCH_CHECK(false, op, ": unsupported target dtype ", target_dtype);
    }
  };
  switch (value_dtype) {
    case at::kFloat: return with_target(float{});
    case at::kBFloat16: return with_target(c10::BFloat16{});
    case at::kDouble: return with_target(double{});
    default: TORCH_CHECK(false, op, ": unsupported value dtype ", value_dtype);
  }
}

// Calls fn(std::bool_constant<a>{}, std::bool_constant<b>{}) so the flags become template constants.
template <typename Fn>
void dispatch_flags(bool a, bool b, Fn&& fn) {
  if (a) {
    b ? fn(std::true_type{}, std::true_type{}) : fn(std::true_type{}, std::false_type{});
  } else {
    b ? fn(std::false_type{}, std::true_type{}) : fn(std::false_type{}, std::false_type{});
  }
}

// Where a row's target lives: row r of `target`, or row r of x0 and the matching row of noise
// (sample n % M, same c and t).
template <typename TT>
struct TargetRows {
  const raw_t<TT>* target;
  const raw_t<TT>* x0;
  const raw_t<TT>* noise;
  int64_t rows_per_sample;  // C * T
  int64_t noise_batch;      // M
  int64_t plane;

  inline const raw_t<TT>* noise_row(int64_t row) const {
    const int64_t n = row / rows_per_sample;
    return noise + ((n % noise_batch) * rows_per_sample + row % rows_per_sample) * plane;
  }
};

template <typename TT>
TargetRows<TT> target_rows(const SegmentInputs& in) {
  return {raw_ptr<TT>(in.target), raw_ptr<TT>(in.x0),   raw_ptr<TT>(in.noise),
          in.channels * in.frames, in.noise_batch,      in.plane};
}

// row_sums[k * rows + row] = sum over the row's plane of (v_k - tgt)^2.
template <typename TV, typename TT, bool HAS_REF, bool FROM_NOISE>
void row_sq_err_sums(const SegmentInputs& in, double* row_sums) {
  using acc_t = compute_t<TV>;
  const raw_t<TV>* v_theta = raw_ptr<TV>(in.v_theta);
  const raw_t<TV>* v_ref = raw_ptr<TV>(in.v_ref);
  const TargetRows<TT> tgt = target_rows<TT>(in);
  const int64_t rows = in.batch * in.channels * in.frames;
  const int64_t plane = in.plane;

#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t offset = row * plane;
    const raw_t<TV>* vt = v_theta + offset;
    const raw_t<TV>* vr = HAS_REF ? v_ref + offset : nullptr;
    const raw_t<TT>* target = FROM_NOISE ? nullptr : tgt.target + offset;
    const raw_t<TT>* x0 = FROM_NOISE ? tgt.x0 + offset : nullptr;
    const raw_t<TT>* noise = FROM_NOISE ? tgt.noise_row(row) : nullptr;
    double sum_theta = 0.0;
    double sum_ref = 0.0;
    for (int64_t start = 0; start < plane; start += kChunk) {
      const int64_t stop = start + kChunk < plane ? start + kChunk : plane;
      acc_t chunk_theta = 0;
      acc_t chunk_ref = 0;
#pragma omp simd reduction(+ : chunk_theta, chunk_ref)
      for (int64_t i = start; i < stop; ++i) {
        acc_t g;
        if constexpr (FROM_NOISE) {
          g = static_cast<acc_t>(Elem<TT>::load(noise[i])) - static_cast<acc_t>(Elem<TT>::load(x0[i]));
        } else {
          g = static_cast<acc_t>(Elem<TT>::load(target[i]));
        }
        const acc_t d_theta = static_cast<acc_t>(Elem<TV>::load(vt[i])) - g;
        chunk_theta += d_theta * d_theta;
        if constexpr (HAS_REF) {
          const acc_t d_ref = static_cast<acc_t>(Elem<TV>::load(vr[i])) - g;
          chunk_ref += d_ref * d_ref;
        }
      }
      sum_theta += static_cast<double>(chunk_theta);
      sum_ref += static_cast<double>(chunk_ref);
    }
    row_sums[row] = sum_theta;
    if constexpr (HAS_REF) row_sums[rows + row] = sum_ref;
  }
}

// grad row r = coef[n, seg[t]] * (v_theta - tgt) row r; rows of frames in no segment are zeroed.
template <typename TV, typename TT, bool FROM_NOISE>
void scaled_residual_rows(const SegmentInputs& in, const compute_t<TV>* coef, int64_t num_segments,
                          const int64_t* segment_ids, raw_t<TV>* grad) {
  using acc_t = compute_t<TV>;
  const raw_t<TV>* v_theta = raw_ptr<TV>(in.v_theta);
  const TargetRows<TT> tgt = target_rows<TT>(in);
  const int64_t rows = in.batch * in.channels * in.frames;
  const int64_t plane = in.plane;
  const int64_t frames = in.frames;
  const int64_t rows_per_sample = in.channels * in.frames;

#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t offset = row * plane;
    const int64_t segment = segment_ids[row % frames];
    raw_t<TV>* out = grad + offset;
    if (segment < 0 || segment >= num_segments) {
      // Written explicitly (not 0 * residual) so inf/nan residuals of excluded frames cannot leak.
#pragma omp simd
      for (int64_t i = 0; i < plane; ++i) out[i] = Elem<TV>::store(acc_t(0));
      continue;
    }
    const acc_t scale = coef[(row / rows_per_sample) * num_segments + segment];
    const raw_t<TV>* vt = v_theta + offset;
    const raw_t<TT>* target = FROM_NOISE ? nullptr : tgt.target + offset;
    const raw_t<TT>* x0 = FROM_NOISE ? tgt.x0 + offset : nullptr;
    const raw_t<TT>* noise = FROM_NOISE ? tgt.noise_row(row) : nullptr;
#pragma omp simd
    for (int64_t i = 0; i < plane; ++i) {
      acc_t g;
      if constexpr (FROM_NOISE) {
        g = static_cast<acc_t>(Elem<TT>::load(noise[i])) - static_cast<acc_t>(Elem<TT>::load(x0[i]));
      } else {
        g = static_cast<acc_t>(Elem<TT>::load(target[i]));
      }
      out[i] = Elem<TV>::store(scale * (static_cast<acc_t>(Elem<TV>::load(vt[i])) - g));
    }
  }
}

// out[k, n, s] = sum of row_sums over c and the frames of segment s, in a fixed (c, t) order.
template <typename OutT>
void combine_rows(const SegmentInputs& in, const double* row_sums, const int64_t* segment_ids,
                  int64_t num_values, int64_t num_segments, OutT* out) {
  const int64_t rows = in.batch * in.channels * in.frames;
  std::vector<double> acc(static_cast<size_t>(num_segments));
  for (int64_t k = 0; k < num_values; ++k) {
    for (int64_t n = 0; n < in.batch; ++n) {
      std::fill(acc.begin(), acc.end(), 0.0);
      const double* sample = row_sums + k * rows + n * in.channels * in.frames;
      for (int64_t c = 0; c < in.channels; ++c) {
        for (int64_t t = 0; t < in.frames; ++t) {
          const int64_t segment = segment_ids[t];
          if (segment >= 0 && segment < num_segments) acc[segment] += sample[c * in.frames + t];
        }
      }
      for (int64_t s = 0; s < num_segments; ++s) {
        out[(k * in.batch + n) * num_segments + s] = static_cast<OutT>(acc[s]);
      }
    }
  }
}

}  // namespace

at::Tensor segment_sq_err_sums_cpu(const at::Tensor& v_theta, const OptionalTensor& v_ref,
                                   const OptionalTensor& target, const OptionalTensor& x0,
                                   const OptionalTensor& noise, const at::Tensor& segment_ids,
                                   int64_t num_segments) {
  check_num_segments(kSumsOp, num_segments);
  const SegmentInputs in = check_segment_inputs(kSumsOp, v_theta, v_ref, target, x0, noise,
                                                segment_ids, c10::DeviceType::CPU, /*allow_double=*/true);
  const int64_t num_values = in.has_ref ? 2 : 1;
  const int64_t rows = in.batch * in.channels * in.frames;
  const auto out_dtype = in.value_dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = allocate_output({num_values, in.batch, num_segments}, v_theta.options().dtype(out_dtype));
  std::vector<double> row_sums(static_cast<size_t>(num_values * rows));

  dispatch_dtypes(kSumsOp, in.value_dtype, in.target_dtype, [&](auto value_tag, auto target_tag) {
    using TV = decltype(value_tag);
    using TT = decltype(target_tag);
    dispatch_flags(in.has_ref, in.from_noise, [&](auto has_ref, auto from_noise) {
      row_sq_err_sums<TV, TT, decltype(has_ref)::value, decltype(from_noise)::value>(in, row_sums.data());
    });
  });

  const int64_t* ids = in.segment_ids.data_ptr<int64_t>();
  if (out_dtype == at::kDouble) {
    combine_rows(in, row_sums.data(), ids, num_values, num_segments, out.data_ptr<double>());
  } else {
    combine_rows(in, row_sums.data(), ids, num_values, num_segments, out.data_ptr<float>());
  }
  return out;
}

at::Tensor segment_scaled_residual_cpu(const at::Tensor& v_theta, const OptionalTensor& target,
                                       const OptionalTensor& x0, const OptionalTensor& noise,
                                       const at::Tensor& coef, const at::Tensor& segment_ids) {
  const SegmentInputs in = check_segment_inputs(kResidualOp, v_theta, std::nullopt, target, x0, noise,
                                                segment_ids, c10::DeviceType::CPU, /*allow_double=*/true);
  const at::Tensor coef_c = check_coef(kResidualOp, coef, in);
  const int64_t num_segments = coef_c.size(1);
  at::Tensor grad = allocate_output(in.v_theta.sizes(), in.v_theta.options());
  const int64_t* ids = in.segment_ids.data_ptr<int64_t>();

  dispatch_dtypes(kResidualOp, in.value_dtype, in.target_dtype, [&](auto value_tag, auto target_tag) {
    using TV = decltype(value_tag);
    using TT = decltype(target_tag);
    const auto* coef_ptr = reinterpret_cast<const compute_t<TV>*>(coef_c.data_ptr());
    auto* grad_ptr = reinterpret_cast<raw_t<TV>*>(grad.data_ptr());
    if (in.from_noise) {
      scaled_residual_rows<TV, TT, true>(in, coef_ptr, num_segments, ids, grad_ptr);
    } else {
      scaled_residual_rows<TV, TT, false>(in, coef_ptr, num_segments, ids, grad_ptr);
    }
  });
  return grad;
}

}  // namespace vidpo
