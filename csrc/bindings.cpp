// Python module vidpo._C: the CPU (always) and CUDA (VIDPO_WITH_CUDA builds) paired-loss primitives.
//
// These are plain pybind functions (the GIL is released while the kernels run); kernels/cpp_backend.py
// and kernels/cuda_backend.py wrap them as torch.library custom ops (vidpo::segment_sq_err_sums_cpu,
// ..._cuda) with fake and autograd rules, so torch.compile and FSDP see opaque ops with the right
// output metadata.
//
// torch/python.h (the Tensor type casters) rather than torch/extension.h, which also parses the whole
// C++ frontend and makes this file take minutes to compile.
#include <torch/python.h>

#include <pybind11/stl.h>

#include "segment_sums_ops.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

bool built_with_cuda() {
#ifdef VIDPO_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int openmp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "vidpo C++/OpenMP and CUDA kernels of the fused paired (DPO) loss primitives";

  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("openmp_max_threads", &openmp_max_threads,
        "omp_get_max_threads() of the OpenMP runtime the CPU kernels use (1 without OpenMP)");

  m.def("segment_sq_err_sums_cpu", &vidpo::segment_sq_err_sums_cpu, py::arg("v_theta"),
        py::arg("v_ref"), py::arg("target"), py::arg("x0"), py::arg("noise"), py::arg("segment_ids"),
        py::arg("num_segments"), py::call_guard<py::gil_scoped_release>(),
        "(K, N, S) sums of (v - tgt)^2 per sample and segment; K = 2 with v_ref, else 1");
  m.def("segment_scaled_residual_cpu", &vidpo::segment_scaled_residual_cpu, py::arg("v_theta"),
        py::arg("target"), py::arg("x0"), py::arg("noise"), py::arg("coef"), py::arg("segment_ids"),
        py::call_guard<py::gil_scoped_release>(), "coef[n, segment_ids[t]] * (v_theta - tgt), like v_theta");

#ifdef VIDPO_WITH_CUDA
  m.def("segment_sq_err_sums_cuda", &vidpo::segment_sq_err_sums_cuda, py::arg("v_theta"),
        py::arg("v_ref"), py::arg("target"), py::arg("x0"), py::arg("noise"), py::arg("segment_ids"),
        py::arg("num_segments"), py::call_guard<py::gil_scoped_release>(),
        "CUDA: (K, N, S) sums of (v - tgt)^2 per sample and segment; K = 2 with v_ref, else 1");
  m.def("segment_scaled_residual_cuda", &vidpo::segment_scaled_residual_cuda, py::arg("v_theta"),
        py::arg("target"), py::arg("x0"), py::arg("noise"), py::arg("coef"), py::arg("segment_ids"),
        py::call_guard<py::gil_scoped_release>(), "CUDA: coef[n, segment_ids[t]] * (v_theta - tgt), like v_theta");
#endif
}
