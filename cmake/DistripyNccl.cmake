# Finds NCCL: nccl.h and libnccl.so.2.
#
# Search order, first hit wins:
#   1. NCCL_HOME (CMake variable, then environment variable); if set, it must be valid
#   2. the nvidia/nccl folder of the installed nvidia-nccl-cu12 or nvidia-nccl-cu13 wheel
#   3. the system (/usr, /usr/local with their multiarch library folders)
#
# Sets DISTRIPY_NCCL_ROOT, DISTRIPY_NCCL_INCLUDE_DIR, DISTRIPY_NCCL_LIBRARY, DISTRIPY_NCCL_FOUND_BY
# and DISTRIPY_NCCL_FROM_WHEEL (a wheel's library is found at run time through the package layout
# rather than through an absolute path recorded in the module).

include("${CMAKE_CURRENT_LIST_DIR}/DistripyPythonWheels.cmake")

# Sets <out_inc>/<out_lib> if <include_dir> has nccl.h and one of <lib_dirs> has libnccl.
function(_distripy_probe_nccl include_dir lib_dirs out_inc out_lib)
  set(${out_inc} "" PARENT_SCOPE)
  set(${out_lib} "" PARENT_SCOPE)
  if(NOT EXISTS "${include_dir}/nccl.h")
    return()
  endif()
  foreach(_libdir IN LISTS lib_dirs)
    foreach(_name libnccl.so libnccl.so.2)
      if(EXISTS "${_libdir}/${_name}")
        set(${out_inc} "${include_dir}" PARENT_SCOPE)
        set(${out_lib} "${_libdir}/${_name}" PARENT_SCOPE)
        return()
      endif()
    endforeach()
  endforeach()
endfunction()

set(_searched "")
set(DISTRIPY_NCCL_ROOT "")
set(DISTRIPY_NCCL_FROM_WHEEL OFF)

if(NOT NCCL_HOME AND DEFINED ENV{NCCL_HOME} AND NOT "$ENV{NCCL_HOME}" STREQUAL "")
  set(NCCL_HOME "$ENV{NCCL_HOME}")
endif()
if(NCCL_HOME)
  _distripy_probe_nccl("${NCCL_HOME}/include" "${NCCL_HOME}/lib;${NCCL_HOME}/lib64" _inc _lib)
  if(NOT _inc)
    message(FATAL_ERROR
      "distripy: NCCL_HOME=${NCCL_HOME} is not an NCCL installation: it needs include/nccl.h "
      "and lib/libnccl.so or lib/libnccl.so.2. Point NCCL_HOME at one, unset it to search the "
      "default places, or set DISTRIPY_SKIP_EXT=1 to install without the native layer.")
  endif()
  set(DISTRIPY_NCCL_ROOT "${NCCL_HOME}")
  set(DISTRIPY_NCCL_FOUND_BY "NCCL_HOME")
else()
  list(APPEND _searched "NCCL_HOME: not set")
endif()

if(NOT DISTRIPY_NCCL_ROOT)
  distripy_wheel_dirs(nvidia.nccl _wheel_dirs)
  if(NOT _wheel_dirs)
    list(APPEND _searched "nvidia-nccl-cu12/-cu13 wheel: nvidia.nccl not installed for ${Python_EXECUTABLE}")
  endif()
  foreach(_dir IN LISTS _wheel_dirs)
    _distripy_probe_nccl("${_dir}/include" "${_dir}/lib" _inc _lib)
    if(_inc)
      set(DISTRIPY_NCCL_ROOT "${_dir}")
      set(DISTRIPY_NCCL_FOUND_BY "nvidia-nccl wheel")
      set(DISTRIPY_NCCL_FROM_WHEEL ON)
      break()
    endif()
    list(APPEND _searched "nvidia-nccl wheel: ${_dir} has no include/nccl.h with lib/libnccl.so.2")
  endforeach()
endif()

if(NOT DISTRIPY_NCCL_ROOT)
  foreach(_prefix /usr /usr/local)
    set(_lib_dirs "${_prefix}/lib64" "${_prefix}/lib")
    if(CMAKE_LIBRARY_ARCHITECTURE)
      list(PREPEND _lib_dirs "${_prefix}/lib/${CMAKE_LIBRARY_ARCHITECTURE}")
    endif()
    _distripy_probe_nccl("${_prefix}/include" "${_lib_dirs}" _inc _lib)
    if(_inc)
      set(DISTRIPY_NCCL_ROOT "${_prefix}")
      set(DISTRIPY_NCCL_FOUND_BY "system")
      break()
    endif()
    list(JOIN _lib_dirs ", " _lib_dirs_text)
    list(APPEND _searched "system: ${_prefix}/include/nccl.h with libnccl.so in ${_lib_dirs_text}")
  endforeach()
endif()

if(NOT DISTRIPY_NCCL_ROOT)
  list(JOIN _searched "\n  - " _searched_text)
  message(FATAL_ERROR
    "distripy: NCCL (nccl.h and libnccl.so.2) was not found.\n"
    "Searched, in order:\n  - ${_searched_text}\n"
    "Set NCCL_HOME to an NCCL installation, or `pip install nvidia-nccl-cu12` (or -cu13) into "
    "the build environment, or set DISTRIPY_SKIP_EXT=1 to install the pure-Python part "
    "without distripy._C.")
endif()
set(DISTRIPY_NCCL_INCLUDE_DIR "${_inc}")
set(DISTRIPY_NCCL_LIBRARY "${_lib}")
message(STATUS "distripy: NCCL from ${DISTRIPY_NCCL_FOUND_BY}: ${DISTRIPY_NCCL_LIBRARY}")
