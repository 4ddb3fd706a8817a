"""Packaging and build configuration: the pure-Python install and CMake's dependency search."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _importable_names(folder: Path):
    """The top-level names ``import`` finds in ``folder`` when it is on ``sys.path``."""
    for path in folder.iterdir():
        if path.suffix == ".py":
            yield path.stem
        elif path.is_dir() and (path / "__init__.py").exists():
            yield path.name


def test_nothing_in_the_checkout_shadows_an_installed_package():
    """A command run from the checkout's root (``python -m distripy.cli``, ``python -m pytest``)
    has the root on ``sys.path`` first, a bench script its folder, a test its own: a module or
    package there named like an installed distribution's would be imported in its place by
    whatever imports that (transformers imports the ``kernels`` package when it is installed, and
    a top-level ``kernels/`` folder broke every pipeline run from the root)."""
    from importlib.metadata import packages_distributions

    installed = packages_distributions()
    for folder in (ROOT, ROOT / "bench", ROOT / "tests"):
        clashes = {
            name: installed[name] for name in _importable_names(folder) if name in installed and name != "distripy"
        }
        assert not clashes, f"{folder} shadows installed packages: {clashes}"


def test_transformers_imports_from_the_checkout_root():
    """What the demo's ranks do first, from the root as the README runs it."""
    result = subprocess.run(
        [sys.executable, "-c", "import transformers.activations, diffusers.models.attention"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def pure_python_wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        env={**os.environ, "DISTRIPY_SKIP_EXT": "1"},
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = out.glob("distripy-*.whl")
    return wheel


def test_skip_ext_builds_a_pure_python_wheel_with_every_package(pure_python_wheel):
    assert pure_python_wheel.name.endswith("-py3-none-any.whl"), pure_python_wheel.name
    names = set(zipfile.ZipFile(pure_python_wheel).namelist())
    assert {"distripy/__init__.py", "distripy/kernels/__init__.py", "distripy/runtime/__init__.py"} <= names
    assert {"distripy/pipelines/__init__.py", "distripy/cli.py", "distripy/demo.py", "distripy/serving/engine.py"} <= names
    assert not [name for name in names if "/_C" in name]
    # the trained tiny pipeline the demo loads, whole (configs, tokenizers, weights, its card)
    model = Path(ROOT / "distripy" / "pipelines" / "models" / "tiny-shapes")
    shipped = {f"distripy/pipelines/models/tiny-shapes/{p.relative_to(model).as_posix()}" for p in model.rglob("*") if p.is_file()}
    assert "distripy/pipelines/models/tiny-shapes/unet/diffusion_pytorch_model.safetensors" in shipped
    assert shipped <= names, sorted(shipped - names)
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(pure_python_wheel).read(entry_points).decode()
    assert "distripy = distripy.cli:main" in text  # the `distripy` command


def test_skip_ext_install_imports_and_explains_the_missing_runtime(pure_python_wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(pure_python_wheel).extractall(site)
    # -S and a copy of site-packages (as links) without distripy: torch, which distripy.kernels
    # needs, is importable, but no installed distripy (regular or editable) is visible.
    purelib = Path(sysconfig.get_paths()["purelib"])
    dependencies = tmp_path / "dependencies"
    dependencies.mkdir()
    for entry in purelib.iterdir():
        if not entry.name.lower().startswith(("distripy", "__editable__")):
            (dependencies / entry.name).symlink_to(entry)
    code = (
        f"import sys; sys.path[:0] = [{str(site)!r}, {str(dependencies)!r}]; "
        "import distripy, distripy.kernels, distripy.runtime as r; "
        f"assert distripy.__file__.startswith({str(site)!r}), distripy.__file__; "
        f"assert distripy.kernels.__file__.startswith({str(site)!r}), distripy.kernels.__file__; "
        "assert not r.native_available(); print(r.native_unavailable_reason())"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "DISTRIPY_SKIP_EXT=1" in result.stdout


def _cmake_configure(tmp_path: Path, python: str, **env_overrides) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "NCCL_HOME")}
    env.update(env_overrides)
    return subprocess.run(
        [shutil.which("cmake"), "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-DPython_EXECUTABLE={python}"],
        env=env, capture_output=True, text=True, timeout=300,
    )


needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not on PATH")


@needs_cmake
def test_invalid_cuda_home_stops_the_build_naming_it(tmp_path):
    empty = tmp_path / "not-cuda"
    empty.mkdir()
    result = _cmake_configure(tmp_path, sys.executable, CUDA_HOME=str(empty))
    assert result.returncode != 0
    message = " ".join(result.stderr.split())  # CMake wraps long messages
    assert f"CUDA_HOME={empty} is not a CUDA installation" in message
    assert "DISTRIPY_SKIP_EXT=1" in message


def _system_has_nccl() -> bool:
    return any(Path(prefix, "include", "nccl.h").exists() for prefix in ("/usr", "/usr/local"))


@needs_cmake
@pytest.mark.skipif(_system_has_nccl(), reason="this machine has a system NCCL")
def test_missing_nccl_stops_the_build_naming_every_place_searched(tmp_path):
    # A valid-looking CUDA root, so that the search reaches NCCL.
    cuda = tmp_path / "cuda"
    for name in ("include/cuda_runtime_api.h", "include/crt/host_defines.h", "include/nv/target",
                 "lib64/libcudart_static.a"):
        (cuda / name).parent.mkdir(parents=True, exist_ok=True)
        (cuda / name).write_text("")
    # An interpreter without the NCCL wheel.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    result = _cmake_configure(tmp_path, python, CUDA_HOME=str(cuda))
    assert result.returncode != 0
    message = " ".join(result.stderr.split())  # CMake wraps long messages
    assert "NCCL (nccl.h and libnccl.so.2) was not found" in message
    assert "NCCL_HOME: not set" in message
    assert f"nvidia.nccl not installed for {python}" in message
    assert "system: /usr/include/nccl.h" in message
    assert "DISTRIPY_SKIP_EXT=1" in message


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    tests_section = readme.split("\n## Tests\n", 1)[1]
    readme_command = tests_section.split("```bash\n", 1)[1].split("\n", 1)[0].strip()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    ci_command = ci_lines[ci_lines.index("# The README's test command:") + 1]
    assert ci_command.startswith(readme_command + " 2>&1 | tee"), (readme_command, ci_command)


def test_ci_runs_exactly_the_readme_quick_start():
    """The README's quick start is one command that installs distripy and runs the demo; CI runs
    that very line (what is specific to its machines comes before it, in .ci/run)."""
    quick_start = (ROOT / "README.md").read_text().split("\n## Quick start\n", 1)[1]
    readme_command = quick_start.split("```bash\n", 1)[1].split("\n", 1)[0].strip()
    assert readme_command.startswith("pip install -e ") and readme_command.endswith("&& distripy demo")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    ci_command = ci_lines[ci_lines.index("# The README's quick start:") + 1]
    assert ci_command == readme_command, (readme_command, ci_command)


def test_nccl_comes_from_torch_or_an_extra_never_a_hard_dependency():
    """nvidia-nccl-cu12 and -cu13 both install nvidia/nccl/lib/libnccl.so.2: a hard dependency on
    one would overwrite the library a CUDA-13 torch runs with."""
    from importlib.metadata import requires

    requirements = requires("distripy") or []
    nccl = [r for r in requirements if r.startswith("nvidia-nccl")]
    assert nccl, requirements
    assert all("extra ==" in r for r in nccl), nccl
    assert any("nccl-cu12" in r and "nvidia-nccl-cu12" in r for r in nccl)
    assert any("nccl-cu13" in r and "nvidia-nccl-cu13" in r for r in nccl)
