#include "runtime_info.h"

#include <string>

#include "error.h"

namespace distripy {

namespace {

std::tuple<int, int, int> decode_nccl_version(int code) {
  // NCCL encodes major*10000 + minor*100 + patch since 2.9, major*1000 + minor*100 + patch before.
  if (code >= 20900) {
    return {code / 10000, (code % 10000) / 100, code % 100};
  }
  return {code / 1000, (code % 1000) / 100, code % 100};
}

std::tuple<int, int> decode_cuda_version(int code) { return {code / 1000, (code % 1000) / 10}; }

std::string version_string(int major, int minor) {
  return std::to_string(major) + "." + std::to_string(minor);
}

}  // namespace

[[noreturn]] void throw_cuda_error(cudaError_t code, const char* call, const char* file, int line) {
  throw CudaError(std::string(call) + " failed: " + cudaGetErrorName(code) + " (" +
                      std::to_string(static_cast<int>(code)) + "): " + cudaGetErrorString(code) + " [" + file +
                      ":" + std::to_string(line) + "]",
                  code);
}

[[noreturn]] void throw_nccl_error(ncclResult_t code, const char* call, const char* file, int line) {
  throw NcclError(std::string(call) + " failed: NCCL error " + std::to_string(static_cast<int>(code)) + ": " +
                      ncclGetErrorString(code) + " [" + file + ":" + std::to_string(line) + "]",
                  code);
}

std::tuple<int, int, int> nccl_version() {
  int code = 0;
  DISTRIPY_NCCL_CHECK(ncclGetVersion(&code));
  return decode_nccl_version(code);
}

std::tuple<int, int> cuda_runtime_version() {
  int code = 0;
  DISTRIPY_CUDA_CHECK(cudaRuntimeGetVersion(&code));
  return decode_cuda_version(code);
}

std::tuple<int, int> cuda_driver_version() {
  int code = 0;  // stays 0 when no driver is installed
  DISTRIPY_CUDA_CHECK(cudaDriverGetVersion(&code));
  return decode_cuda_version(code);
}

int device_count() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status == cudaSuccess) {
    return count;
  }
  (void)cudaGetLastError();  // the failure is answered here; do not leave it for the next call
  if (status == cudaErrorNoDevice) {
    return 0;
  }
  if (status == cudaErrorInsufficientDriver) {
    const auto [driver_major, driver_minor] = cuda_driver_version();
    if (driver_major == 0) {
      return 0;  // no driver installed: a machine without a GPU
    }
    const auto [runtime_major, runtime_minor] = cuda_runtime_version();
    throw CudaError("cudaGetDeviceCount failed: the NVIDIA driver supports CUDA up to " +
                        version_string(driver_major, driver_minor) + " but distripy._C was built with CUDA runtime " +
                        version_string(runtime_major, runtime_minor) +
                        "; upgrade the driver or rebuild distripy with CUDA_HOME pointing to an older CUDA toolkit",
                    status);
  }
  throw_cuda_error(status, "cudaGetDeviceCount(&count)", __FILE__, __LINE__);
}

std::map<std::string, std::string> build_info() {
  const auto [nccl_major, nccl_minor, nccl_patch] = decode_nccl_version(NCCL_VERSION_CODE);
  const std::string nccl = version_string(nccl_major, nccl_minor) + "." + std::to_string(nccl_patch);
  const auto [cuda_major, cuda_minor] = decode_cuda_version(CUDART_VERSION);
  return {
      {"cuda_runtime_version", version_string(cuda_major, cuda_minor)},
      {"cuda_root", DISTRIPY_BUILD_CUDA_ROOT},
      {"cuda_found_by", DISTRIPY_BUILD_CUDA_FOUND_BY},
      {"nccl_version", nccl},
      {"nccl_library", DISTRIPY_BUILD_NCCL_LIBRARY},
      {"nccl_found_by", DISTRIPY_BUILD_NCCL_FOUND_BY},
      {"compiler", __VERSION__},
  };
}

}  // namespace distripy
