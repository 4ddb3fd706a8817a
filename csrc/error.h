// Error checking for every CUDA runtime and NCCL call.
//
// A failing call throws CudaError or NcclError whose message names the call as written, the
// error code's name and number, the library's text for it, and the source location. The pybind11
// module translates them to the Python exceptions distripy._C.CudaError / distripy._C.NcclError
// (both subclasses of RuntimeError).
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <stdexcept>
#include <string>

namespace distripy {

class CudaError : public std::runtime_error {
 public:
  CudaError(const std::string& message, cudaError_t code) : std::runtime_error(message), code_(code) {}
  cudaError_t code() const noexcept { return code_; }

 private:
  cudaError_t code_;
};

class NcclError : public std::runtime_error {
 public:
  NcclError(const std::string& message, ncclResult_t code) : std::runtime_error(message), code_(code) {}
  ncclResult_t code() const noexcept { return code_; }

 private:
  ncclResult_t code_;
};

[[noreturn]] void throw_cuda_error(cudaError_t code, const char* call, const char* file, int line);
[[noreturn]] void throw_nccl_error(ncclResult_t code, const char* call, const char* file, int line);

}  // namespace distripy

#define DISTRIPY_CUDA_CHECK(call)                                              \
  do {                                                                         \
    const cudaError_t distripy_status_ = (call);                               \
    if (distripy_status_ != cudaSuccess) {                                     \
      ::distripy::throw_cuda_error(distripy_status_, #call, __FILE__, __LINE__); \
    }                                                                          \
  } while (0)

#define DISTRIPY_NCCL_CHECK(call)                                              \
  do {                                                                         \
    const ncclResult_t distripy_status_ = (call);                              \
    if (distripy_status_ != ncclSuccess) {                                     \
      ::distripy::throw_nccl_error(distripy_status_, #call, __FILE__, __LINE__); \
    }                                                                          \
  } while (0)
