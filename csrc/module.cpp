// distripy._C: the native communication runtime. Python sees only this module; the C++ behind it
// knows nothing of torch (buffers and streams cross the boundary as raw pointers and handles).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "error.h"
#include "runtime_info.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "distripy native runtime: CUDA/NCCL queries (and, as it grows, the NCCL communicator).";

  py::register_exception<distripy::CudaError>(m, "CudaError", PyExc_RuntimeError);
  py::register_exception<distripy::NcclError>(m, "NcclError", PyExc_RuntimeError);

  m.def("nccl_version", &distripy::nccl_version,
        "Version of the NCCL library loaded at run time, as (major, minor, patch).");
  m.def("cuda_runtime_version", &distripy::cuda_runtime_version,
        "Version of the CUDA runtime linked into distripy._C, as (major, minor).");
  m.def("cuda_driver_version", &distripy::cuda_driver_version,
        "Highest CUDA version the installed driver supports, as (major, minor); (0, 0) without a driver.");
  m.def("device_count", &distripy::device_count,
        "Number of visible CUDA devices; 0 without a GPU or driver. Raises CudaError if a driver is "
        "present but cannot serve this runtime.");
  m.def("build_info", &distripy::build_info,
        "How distripy._C was built: CUDA runtime and NCCL versions and where they were found.");
}
