"""The Python face of distripy's communication layer.

``native()`` returns the C++/NCCL runtime ``distripy._C``; when it is absent (installed with
``DISTRIPY_SKIP_EXT=1``, or its shared libraries cannot be loaded) it raises
``NativeRuntimeUnavailable`` with the reason and the remedy.
"""

from distripy.runtime.loader import (
    NativeRuntimeUnavailable,
    native,
    native_available,
    native_unavailable_reason,
)

__all__ = ["NativeRuntimeUnavailable", "native", "native_available", "native_unavailable_reason"]
