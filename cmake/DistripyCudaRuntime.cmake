# Finds the CUDA runtime: its headers and its static library libcudart_static.a.
#
# The extension is host C++ only, so the runtime is all it needs from CUDA. It links the static
# runtime (as NCCL itself does), so the built module depends on no libcudart at run time and a
# CUDA stream or event handle from any other runtime in the process (PyTorch's, CuPy's) is valid.
#
# Search order, first hit wins:
#   1. CUDA_HOME (CMake variable, then environment variable); if set, it must be valid
#   2. the toolkit of the first `nvcc` on PATH
#   3. /usr/local/cuda
#   4. the nvidia/cuda_runtime folder of the nvidia-cuda-runtime-cu12 wheel (headers + libraries).
#      Its headers include two that ship in other wheels: crt/host_defines.h
#      (nvidia-cuda-nvcc-cu12) and nv/target (nvidia-cuda-cccl-cu12, via nccl.h -> cuda_fp16.h);
#      those wheels' include folders are added where the root lacks them.
#
# Sets DISTRIPY_CUDA_ROOT, DISTRIPY_CUDA_INCLUDE_DIRS, DISTRIPY_CUDART_LIBRARY, DISTRIPY_CUDA_FOUND_BY.

include("${CMAKE_CURRENT_LIST_DIR}/DistripyPythonWheels.cmake")

# Headers the runtime's own headers include, which a toolkit has but the runtime wheel lacks.
set(_distripy_cuda_companion_headers crt/host_defines.h nv/target)

# Sets <out_inc> (include folders) and <out_lib> if <root> holds the runtime headers and static
# library, else clears them. <extra_includes> may supply the companion headers <root> lacks.
function(_distripy_probe_cuda_root root extra_includes out_inc out_lib)
  set(${out_inc} "" PARENT_SCOPE)
  set(${out_lib} "" PARENT_SCOPE)
  if(NOT EXISTS "${root}/include/cuda_runtime_api.h")
    return()
  endif()
  set(_includes "${root}/include")
  foreach(_header IN LISTS _distripy_cuda_companion_headers)
    set(_found "")
    foreach(_dir "${root}/include" ${extra_includes})
      if(EXISTS "${_dir}/${_header}")
        set(_found "${_dir}")
        break()
      endif()
    endforeach()
    if(NOT _found)
      return()
    endif()
    list(APPEND _includes "${_found}")
  endforeach()
  list(REMOVE_DUPLICATES _includes)
  foreach(_libdir lib64 lib "targets/${CMAKE_SYSTEM_PROCESSOR}-linux/lib")
    if(EXISTS "${root}/${_libdir}/libcudart_static.a")
      set(${out_inc} "${_includes}" PARENT_SCOPE)
      set(${out_lib} "${root}/${_libdir}/libcudart_static.a" PARENT_SCOPE)
      return()
    endif()
  endforeach()
endfunction()

set(_companion_includes "")
foreach(_module nvidia.cuda_nvcc nvidia.cuda_cccl)
  distripy_wheel_dirs(${_module} _dirs)
  foreach(_dir IN LISTS _dirs)
    list(APPEND _companion_includes "${_dir}/include")
  endforeach()
endforeach()

set(_searched "")
set(_candidates "")   # pairs "label|root"

if(NOT CUDA_HOME AND DEFINED ENV{CUDA_HOME} AND NOT "$ENV{CUDA_HOME}" STREQUAL "")
  set(CUDA_HOME "$ENV{CUDA_HOME}")
endif()
if(CUDA_HOME)
  _distripy_probe_cuda_root("${CUDA_HOME}" "${_companion_includes}" _inc _lib)
  if(NOT _inc)
    message(FATAL_ERROR
      "distripy: CUDA_HOME=${CUDA_HOME} is not a CUDA installation: it needs "
      "include/cuda_runtime_api.h, include/crt/host_defines.h and include/nv/target (or the "
      "nvidia-cuda-nvcc-cu12 and nvidia-cuda-cccl-cu12 wheels), and lib64/ or lib/libcudart_static.a. "
      "Point CUDA_HOME at a CUDA toolkit (the folder holding bin/nvcc), unset it to search "
      "the default places, or set DISTRIPY_SKIP_EXT=1 to install without the native layer.")
  endif()
  list(APPEND _candidates "CUDA_HOME|${CUDA_HOME}")
else()
  list(APPEND _searched "CUDA_HOME: not set")
endif()

set(_nvcc "")
string(REPLACE ":" ";" _path_dirs "$ENV{PATH}")
foreach(_dir IN LISTS _path_dirs)
  if(_dir AND EXISTS "${_dir}/nvcc" AND NOT IS_DIRECTORY "${_dir}/nvcc")
    set(_nvcc "${_dir}/nvcc")
    break()
  endif()
endforeach()
if(_nvcc)
  get_filename_component(_nvcc_real "${_nvcc}" REALPATH)
  get_filename_component(_nvcc_bin "${_nvcc_real}" DIRECTORY)
  get_filename_component(_nvcc_root "${_nvcc_bin}" DIRECTORY)
  list(APPEND _candidates "toolkit of nvcc on PATH (${_nvcc})|${_nvcc_root}")
else()
  list(APPEND _searched "toolkit of nvcc on PATH: no nvcc on PATH")
endif()

list(APPEND _candidates "/usr/local/cuda|/usr/local/cuda")

distripy_wheel_dirs(nvidia.cuda_runtime _wheel_dirs)
if(_wheel_dirs)
  foreach(_dir IN LISTS _wheel_dirs)
    list(APPEND _candidates "nvidia-cuda-runtime-cu12 wheel|${_dir}")
  endforeach()
else()
  list(APPEND _searched "nvidia-cuda-runtime-cu12 wheel: nvidia.cuda_runtime not installed for ${Python_EXECUTABLE}")
endif()

set(DISTRIPY_CUDA_ROOT "")
foreach(_candidate IN LISTS _candidates)
  string(FIND "${_candidate}" "|" _bar)
  string(SUBSTRING "${_candidate}" 0 ${_bar} _label)
  math(EXPR _start "${_bar} + 1")
  string(SUBSTRING "${_candidate}" ${_start} -1 _root)
  _distripy_probe_cuda_root("${_root}" "${_companion_includes}" _inc _lib)
  if(_inc)
    set(DISTRIPY_CUDA_ROOT "${_root}")
    set(DISTRIPY_CUDA_INCLUDE_DIRS "${_inc}")
    set(DISTRIPY_CUDART_LIBRARY "${_lib}")
    set(DISTRIPY_CUDA_FOUND_BY "${_label}")
    break()
  endif()
  list(APPEND _searched "${_label}: ${_root} lacks include/cuda_runtime_api.h, crt/host_defines.h, nv/target or lib64/ or lib/libcudart_static.a")
endforeach()

if(NOT DISTRIPY_CUDA_ROOT)
  list(JOIN _searched "\n  - " _searched_text)
  message(FATAL_ERROR
    "distripy: the CUDA runtime (include/cuda_runtime_api.h and libcudart_static.a) was not found.\n"
    "Searched, in order:\n  - ${_searched_text}\n"
    "Set CUDA_HOME to a CUDA toolkit, or `pip install nvidia-cuda-runtime-cu12 "
    "nvidia-cuda-nvcc-cu12 nvidia-cuda-cccl-cu12` into the build environment, or set DISTRIPY_SKIP_EXT=1 to install the pure-Python part without distripy._C.")
endif()
message(STATUS "distripy: CUDA runtime from ${DISTRIPY_CUDA_FOUND_BY}: ${DISTRIPY_CUDA_ROOT}")
