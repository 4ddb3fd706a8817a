# Locations of an NVIDIA Python wheel's package folder (e.g. nvidia.nccl -> .../site-packages/nvidia/nccl)
# for the Python interpreter the extension is built for. The wheels are how a machine without a
# system CUDA or NCCL installation gets their headers and libraries.

function(distripy_wheel_dirs module out_var)
  set(_script [=[
import importlib.util, sys
try:
    spec = importlib.util.find_spec(sys.argv[1])
except ImportError:
    spec = None
locations = list(spec.submodule_search_locations or []) if spec is not None else []
print(";".join(locations), end="")
]=])
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "${_script}" "${module}"
    OUTPUT_VARIABLE _dirs
    RESULT_VARIABLE _rc
    ERROR_QUIET)
  if(NOT _rc EQUAL 0)
    set(_dirs "")
  endif()
  set(${out_var} "${_dirs}" PARENT_SCOPE)
endfunction()

# The site-packages folder of the Python the extension is built for (sysconfig's purelib).
function(distripy_site_packages out_var)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import sysconfig; print(sysconfig.get_paths()['purelib'], end='')"
    OUTPUT_VARIABLE _dir
    RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "distripy: cannot ask ${Python_EXECUTABLE} for its site-packages folder")
  endif()
  set(${out_var} "${_dir}" PARENT_SCOPE)
endfunction()
