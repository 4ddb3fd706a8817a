"""Loading the native runtime ``distripy._C``, and saying why when it cannot be loaded.

``distripy._C`` links ``libnccl.so.2``. A regular install finds the NCCL wheel's library through
the module's run path (``site-packages/nvidia/nccl/lib``); an editable install cannot, because the
module sits in the source tree, so on that failure the wheel's library is loaded here first and the
import is tried once more.
"""

import ctypes
import importlib
import importlib.util
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import List, Optional, Sequence

from distripy.errors import NativeRuntimeUnavailable

__all__ = [
    "NativeRuntimeUnavailable",
    "nccl_version_mismatch",
    "native",
    "native_available",
    "native_unavailable_reason",
]

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_reason: Optional[str] = None


def _wheel_nccl_libraries() -> List[Path]:
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except ImportError:
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    candidates = (Path(folder) / "lib" / "libnccl.so.2" for folder in spec.submodule_search_locations)
    return [path for path in candidates if path.is_file()]


def _explain(error: ImportError) -> str:
    if isinstance(error, ModuleNotFoundError) and error.name == "distripy._C":
        return (
            "distripy._C, the native NCCL runtime, is not part of this installation: distripy was "
            "installed with DISTRIPY_SKIP_EXT=1 (pure Python), or is imported from a source "
            "checkout that was never built. Reinstall with the CUDA runtime and NCCL available "
            "(`pip install .` from the source folder; see README.md), or use the torch.distributed "
            "backend, which needs no native layer."
        )
    return (
        f"distripy._C is installed but could not be loaded: {error}. If a shared library is "
        "missing, install the NCCL wheel (`pip install nvidia-nccl-cu12`) or add the folder "
        "holding libnccl.so.2 to LD_LIBRARY_PATH; otherwise rebuild distripy (`pip install .`)."
    )


def _load() -> ModuleType:
    try:
        return importlib.import_module("distripy._C")
    except ModuleNotFoundError:
        raise
    except ImportError as first_error:
        libraries = _wheel_nccl_libraries()
        if "libnccl" not in str(first_error) or not libraries:
            raise
        ctypes.CDLL(str(libraries[0]), mode=ctypes.RTLD_GLOBAL)
        return importlib.import_module("distripy._C")


def _torch_nccl_version() -> Optional[Sequence[int]]:
    """The NCCL version torch runs with, or None (a CPU build has none)."""
    try:
        import torch

        version = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - no NCCL in this torch
        return None
    if isinstance(version, int):  # older torch: 2.21.5 as 22105
        return (version // 10000, version // 100 % 100, version % 100)
    return tuple(version)


def nccl_version_mismatch(ours: Sequence[int], torchs: Optional[Sequence[int]]) -> Optional[str]:
    """Why the NCCL distripy._C loaded and torch's differ (major.minor), or None. Both should be
    the one ``libnccl.so.2`` of the NVIDIA wheel torch depends on; two different ones mean a second
    NCCL wheel overwrote the first (``nvidia-nccl-cu12`` and ``nvidia-nccl-cu13`` install the same
    file) or a library path points elsewhere."""
    if torchs is None or tuple(ours[:2]) == tuple(torchs[:2]):
        return None
    mine = ".".join(str(v) for v in ours)
    theirs = ".".join(str(v) for v in torchs)
    return (
        f"distripy._C runs with NCCL {mine} but torch with NCCL {theirs}: two NCCL libraries in one "
        "process. Install only the nvidia-nccl wheel torch depends on (pip check; not both "
        "nvidia-nccl-cu12 and nvidia-nccl-cu13) and leave LD_LIBRARY_PATH without another libnccl."
    )


def _ensure_loaded() -> None:
    global _module, _reason
    with _lock:
        if _module is not None or _reason is not None:
            return
        try:
            _module = _load()
        except ImportError as error:
            _reason = _explain(error)
            return
    version = getattr(_module, "nccl_version", None)
    mismatch = nccl_version_mismatch(version(), _torch_nccl_version()) if version is not None else None
    if mismatch:
        warnings.warn(mismatch, RuntimeWarning, stacklevel=3)


def native() -> ModuleType:
    """The native runtime module ``distripy._C``; raises NativeRuntimeUnavailable when absent."""
    _ensure_loaded()
    if _module is None:
        raise NativeRuntimeUnavailable(_reason)
    return _module


def native_available() -> bool:
    """Whether ``distripy._C`` can be loaded in this process."""
    _ensure_loaded()
    return _module is not None


def native_unavailable_reason() -> Optional[str]:
    """Why ``distripy._C`` cannot be loaded, or None when it can."""
    _ensure_loaded()
    return _reason
