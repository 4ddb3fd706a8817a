// What the process can see of CUDA and NCCL: library versions, the driver, the devices, and how
// this module was built. Everything here works on a machine with no GPU and no driver.
#pragma once

#include <map>
#include <string>
#include <tuple>

namespace distripy {

// Version of the NCCL library loaded at run time, as (major, minor, patch).
std::tuple<int, int, int> nccl_version();

// Version of the CUDA runtime linked into this module, as (major, minor).
std::tuple<int, int> cuda_runtime_version();

// Highest CUDA version the installed driver supports, as (major, minor); (0, 0) without a driver.
std::tuple<int, int> cuda_driver_version();

// Number of CUDA devices visible to this process. 0 when there is no GPU or no driver; throws
// CudaError when a driver is present but unusable (e.g. older than the runtime needs).
int device_count();

// How this module was built: compile-time CUDA runtime and NCCL versions and where they came from.
std::map<std::string, std::string> build_info();

}  // namespace distripy
