"""Build and install distripy.

The native runtime ``distripy._C`` is built by CMake (``CMakeLists.txt``), driven from here.

Environment variables:
  DISTRIPY_SKIP_EXT=1     install the pure-Python part only (no CUDA/NCCL needed)
  CUDA_HOME, NCCL_HOME    where CMake looks first for the CUDA runtime and NCCL
  DISTRIPY_BUILD_TYPE     CMake build type (default Release)
  CMAKE_BUILD_PARALLEL_LEVEL  compile jobs (default: number of CPUs)
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
TRUE_VALUES = {"1", "true", "yes", "on"}


def skip_native_extension() -> bool:
    return os.environ.get("DISTRIPY_SKIP_EXT", "").strip().lower() in TRUE_VALUES


def read_version() -> str:
    namespace = {}
    exec((ROOT / "distripy" / "_version.py").read_text(), namespace)
    return namespace["__version__"]


class CMakeExtension(Extension):
    """An extension whose sources are built by the CMake project in ``source_dir``."""

    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    """Configures and builds the CMake project, placing the module where setuptools expects it."""

    def _builds_in_place(self) -> bool:
        """True for an editable install: the module stays in the source tree, outside site-packages."""
        return bool(self.inplace or getattr(self, "editable_mode", False))

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError(
                "distripy: cmake is not on PATH; `pip install cmake` (or set DISTRIPY_SKIP_EXT=1 "
                "to install without the native layer)"
            )
        import pybind11

        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_type = os.environ.get("DISTRIPY_BUILD_TYPE", "Debug" if self.debug else "Release")
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            cmake,
            "-S", str(ext.source_dir),
            "-B", str(build_dir),
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output.parent}",
            f"-DDISTRIPY_RPATH_SITE_PACKAGES={'ON' if self._builds_in_place() else 'OFF'}",
        ]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        if not output.exists():
            raise RuntimeError(f"distripy: CMake finished but {output} was not produced")


if skip_native_extension():
    ext_modules = []
else:
    ext_modules = [CMakeExtension("distripy._C", ROOT)]

LINUX = "platform_system == 'Linux'"

setup(
    name="distripy",
    version=read_version(),
    description="Displaced patch parallelism for high-resolution diffusion on many GPUs",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["distripy", "distripy.*"]),
    package_data={
        # the trained tiny pipeline (bench/train_tiny.py): configs, tokenizers, safetensors
        "distripy.pipelines": [
            "models/*/*.json",
            "models/*/*.md",
            "models/*/*/*.json",
            "models/*/*/*.txt",
            "models/*/*/*.safetensors",
        ],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.4",
        f"triton>=3.0; {LINUX}",
        "numpy>=1.24",
        "diffusers>=0.30",
        "transformers>=4.40",
        "safetensors>=0.4",
        "peft>=0.14",  # LoRA adapters (diffusers loads them through PEFT)
        "scipy>=1.10",  # diffusers' LMS scheduler (`distripy generate --scheduler lms`)
        # NCCL: the nvidia-nccl wheel a CUDA build of torch depends on (cu12 or cu13; both install
        # nvidia/nccl/lib/libnccl.so.2, so depending on one would overwrite the other's library).
        # A torch without NCCL (CPU builds) takes an extra below.
    ],
    extras_require={
        "nccl-cu12": [f"nvidia-nccl-cu12>=2.18; {LINUX}"],
        "nccl-cu13": [f"nvidia-nccl-cu13; {LINUX}"],
        # `distripy serve`: an ASGI app on uvicorn, Prometheus metrics
        "serve": ["fastapi>=0.100", "uvicorn>=0.23", "prometheus-client>=0.17"],
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.6",  # the README's `-n 3`, and --no-loadscope-reorder
            "cmake>=3.18",
            "wheel",
            "matplotlib>=3.7",
            "fastapi>=0.100",
            "uvicorn>=0.23",
            "prometheus-client>=0.17",
            "openai>=1.76",  # the official client (its gpt-image fields) against `distripy serve`
            # what ComfyUI's sampling imports (the ComfyUI integration's tests, tests/comfyui_tree.py)
            "einops",
            "torchsde",
            "comfy-aimdo>=0.6",
            "psutil",
            "scipy",
            "tqdm",
        ],
        "bench": ["matplotlib>=3.7", f"cupy-cuda12x>=13; {LINUX}", "torchmetrics>=1.3", "clean-fid>=0.1.35"],
    },
    entry_points={
        "console_scripts": ["distripy = distripy.cli:main"],
        # pip-installed ComfyUI forks load custom nodes from this group (docs/comfyui.md)
        "comfyui.custom_nodes": ["distripy = distripy.comfyui"],
    },
    zip_safe=False,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Operating System :: POSIX :: Linux",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
