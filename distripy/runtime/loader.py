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
from pathlib import Path
from types import ModuleType
from typing import List, Optional

from distripy.errors import NativeRuntimeUnavailable

__all__ = ["NativeRuntimeUnavailable", "native", "native_available", "native_unavailable_reason"]

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


def _ensure_loaded() -> None:
    global _module, _reason
    with _lock:
        if _module is not None or _reason is not None:
            return
        try:
            _module = _load()
        except ImportError as error:
            _reason = _explain(error)


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
