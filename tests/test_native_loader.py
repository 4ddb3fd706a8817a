"""distripy.runtime.native(): loads distripy._C, or says why it cannot and what to do."""

import subprocess
import sys
import textwrap

import pytest

from distripy.runtime import loader as loader


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_absent_extension_is_explained_not_a_bare_import_error():
    result = _run(
        """
        import sys
        sys.modules["distripy._C"] = None  # what an install with DISTRIPY_SKIP_EXT=1 looks like
        from distripy import runtime
        assert not runtime.native_available()
        reason = runtime.native_unavailable_reason()
        try:
            runtime.native()
        except runtime.NativeRuntimeUnavailable as error:
            assert str(error) == reason
            assert isinstance(error, ImportError)
            print(reason)
        else:
            raise SystemExit("native() returned without the extension")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "DISTRIPY_SKIP_EXT=1" in result.stdout
    assert "pip install ." in result.stdout


def test_unloadable_library_is_explained(monkeypatch):
    def fail(name):
        raise ImportError("libnccl.so.2: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(loader.importlib, "import_module", fail)
    monkeypatch.setattr(loader, "_wheel_nccl_libraries", lambda: [])
    monkeypatch.setattr(loader, "_module", None)
    monkeypatch.setattr(loader, "_reason", None)
    with pytest.raises(loader.NativeRuntimeUnavailable) as error:
        loader.native()
    message = str(error.value)
    assert "installed but could not be loaded" in message
    assert "libnccl.so.2: cannot open shared object file" in message
    assert "LD_LIBRARY_PATH" in message


def test_missing_nccl_is_preloaded_from_the_wheel_and_retried(monkeypatch, tmp_path):
    calls, preloaded = [], []
    sentinel = object()

    def import_module(name):
        calls.append(name)
        if len(calls) == 1:
            raise ImportError("libnccl.so.2: cannot open shared object file")
        return sentinel

    library = tmp_path / "libnccl.so.2"
    monkeypatch.setattr(loader.importlib, "import_module", import_module)
    monkeypatch.setattr(loader, "_wheel_nccl_libraries", lambda: [library])
    monkeypatch.setattr(loader.ctypes, "CDLL", lambda path, mode: preloaded.append((path, mode)))
    monkeypatch.setattr(loader, "_module", None)
    monkeypatch.setattr(loader, "_reason", None)
    assert loader.native() is sentinel
    assert calls == ["distripy._C", "distripy._C"]
    assert preloaded == [(str(library), loader.ctypes.RTLD_GLOBAL)]
