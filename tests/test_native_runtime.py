"""distripy._C: the native runtime builds, loads, and reports its CUDA/NCCL environment truthfully.

These need the built extension; they fail (not skip) without it, unless the test run itself says
it installed distripy without it (DISTRIPY_SKIP_EXT=1).
"""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distripy import runtime

if os.environ.get("DISTRIPY_SKIP_EXT", "").lower() in {"1", "true", "yes", "on"}:
    pytest.skip("distripy installed with DISTRIPY_SKIP_EXT=1: no native runtime", allow_module_level=True)

C = runtime.native()


def _loaded_library(fragment: str) -> Path:
    """Path of the shared library mapped into this process whose file name contains fragment."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and fragment in os.path.basename(parts[5]):
            return Path(parts[5])
    raise AssertionError(f"no library named like {fragment!r} is loaded")


def _wheel_version_of(library: Path):
    """Version of the installed nvidia-nccl wheel that owns library, or None."""
    for name in ("nvidia-nccl-cu12", "nvidia-nccl-cu13"):
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        owned = Path(distribution.locate_file("nvidia/nccl/lib/libnccl.so.2")).resolve()
        if owned == library.resolve():
            return tuple(int(part) for part in re.findall(r"\d+", distribution.version)[:3])
    return None


def test_nccl_version_is_the_loaded_library():
    version = C.nccl_version()
    assert isinstance(version, tuple) and len(version) == 3
    assert all(isinstance(part, int) for part in version)
    assert version >= (2, 18, 0), version
    library = _loaded_library("libnccl.so")
    wheel_version = _wheel_version_of(library)
    if wheel_version is not None:
        assert version == wheel_version, f"{library} belongs to NCCL {wheel_version}"
    # The headers the module was compiled against have the same major version.
    assert int(C.build_info()["nccl_version"].split(".")[0]) == version[0]


def test_cuda_runtime_version_is_the_one_compiled_in():
    version = C.cuda_runtime_version()
    assert isinstance(version, tuple) and len(version) == 2
    info = C.build_info()
    assert ".".join(map(str, version)) == info["cuda_runtime_version"]
    header = Path(info["cuda_root"]) / "include" / "cuda_runtime_api.h"
    if header.exists():
        code = int(re.search(r"#define\s+CUDART_VERSION\s+(\d+)", header.read_text()).group(1))
        assert version == (code // 1000, (code % 1000) // 10)
    assert version >= (12, 0)


def test_build_info_names_where_dependencies_came_from():
    info = C.build_info()
    assert set(info) >= {
        "cuda_runtime_version", "cuda_root", "cuda_found_by", "nccl_version", "nccl_library",
        "nccl_found_by", "compiler",
    }
    assert Path(info["cuda_root"]).is_absolute()
    assert info["nccl_library"].endswith((".so", ".so.2"))


def test_device_count_agrees_with_torch():
    assert C.device_count() == torch.cuda.device_count()


def test_no_visible_device_means_zero_devices_not_a_crash():
    code = (
        "from distripy import runtime; C = runtime.native(); "
        "print(C.device_count(), C.cuda_driver_version())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    count, driver = result.stdout.split(" ", 1)
    assert count == "0"
    assert re.fullmatch(r"\(\d+, \d+\)\n", driver)


def test_direct_import_finds_nccl_without_the_loader():
    """``import distripy._C`` on its own (as users and other libraries do) must load NCCL through
    the module's run path, in a regular or an editable install alike."""
    code = "import distripy._C as C; print(C.nccl_version() == C.nccl_version(), C.device_count())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", str(torch.cuda.device_count())]


def test_errors_are_python_runtime_errors():
    assert issubclass(C.CudaError, RuntimeError)
    assert issubclass(C.NcclError, RuntimeError)


@pytest.mark.cuda
def test_device_count_on_a_gpu_machine():
    assert C.device_count() >= 1
    # CUDA's minor-version compatibility: a driver of the runtime's major version runs it even when
    # its minor version is older (12.2 driver, 12.8 runtime); only the major version must be reached.
    assert C.cuda_driver_version()[0] >= C.cuda_runtime_version()[0]
