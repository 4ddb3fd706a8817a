"""distripy: one high-resolution diffusion image from N GPUs, about N times faster.

Displaced patch parallelism (DistriFusion): each rank denoises one horizontal band of the latent
and uses its neighbours' activations from the previous denoising step, exchanged asynchronously
while it computes. See README.md and docs/architecture.md.

The public API: ``distripy.init()`` (torch.distributed from torchrun's environment),
``distripy.DistriConfig``, ``distripy.parallelize(model, config)`` and
``distripy.unparallelize(model)``, ``distripy.reset(model, steps=)`` and
``with distripy.generation(model, steps=):`` (a bare model's generations, declared),
``distripy.patch_context(model)``, ``distripy.choose_mode(config, steps)``,
``distripy.reconfigure(model, mode=...)``, ``distripy.alone(model)`` (calls on this rank by
itself), ``distripy.Engine`` (N ranks driven from one process), ``distripy.plan(gpus, size,
steps)`` (the configuration to run, predicted),
and the exceptions of ``distripy.errors`` (all derive from ``DistripyError``).
Importing ``distripy`` is cheap: torch, diffusers and the native runtime ``distripy._C`` load when
first used (``distripy.runtime.native()`` loads the latter and explains its absence).
"""

import pkgutil

# In a source checkout with a regular (non-editable) install, ``import distripy`` from the
# checkout's root finds these sources first; extending the package path lets the installed copy
# supply what only an install has: the built ``distripy._C``.
__path__ = pkgutil.extend_path(__path__, __name__)

from distripy._version import __version__  # noqa: E402

# The public names load torch and diffusers, so they are imported on first use.
_LAZY = {
    "DistriConfig": "distripy.config",
    "DistripyError": "distripy.errors",
    "Engine": "distripy.serving.engine",
    "QualityWarning": "distripy.api",
    "alone": "distripy.api",
    "choose_mode": "distripy.api",
    "generation": "distripy.api",
    "init": "distripy.runtime.distributed",
    "parallelize": "distripy.api",
    "patch_context": "distripy.api",
    "plan": "distripy.api",
    "reconfigure": "distripy.api",
    "reset": "distripy.api",
    "unparallelize": "distripy.api",
}

__all__ = [
    "DistriConfig",
    "DistripyError",
    "Engine",
    "QualityWarning",
    "__version__",
    "alone",
    "choose_mode",
    "generation",
    "init",
    "parallelize",
    "patch_context",
    "plan",
    "reconfigure",
    "reset",
    "unparallelize",
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distripy' has no attribute {name!r}")
