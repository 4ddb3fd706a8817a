"""distripy: one high-resolution diffusion image from N GPUs, about N times faster.

Displaced patch parallelism (DistriFusion): each rank denoises one horizontal band of the latent
and uses its neighbours' activations from the previous denoising step, exchanged asynchronously
while it computes. See README.md and DESIGN.md.

Importing ``distripy`` is cheap: it loads neither torch nor the native runtime ``distripy._C``
(``distripy.runtime.native()`` loads the latter and explains its absence).
"""

import pkgutil

# In a source checkout with a regular (non-editable) install, ``import distripy`` from the
# checkout's root finds these sources first; extending the package path lets the installed copy
# supply what only an install has: the built ``distripy._C`` and ``distripy.kernels`` (whose
# sources live in the top-level ``kernels/`` folder).
__path__ = pkgutil.extend_path(__path__, __name__)

from distripy._version import __version__  # noqa: E402

__all__ = ["__version__"]
