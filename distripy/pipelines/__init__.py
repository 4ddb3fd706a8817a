"""Everything that knows diffusers objects: which modules swap and how (``swap``), installing the
patch-parallel forwards on a UNet (``unet``) and a VAE decoder (``vae``), the pipeline glue
(``pipeline``), ControlNets (``controlnet``), and the small seeded-random pipelines of the demo and the tests (``tiny``)."""

from distripy.pipelines.controlnet import parallelize_controlnet
from distripy.pipelines.pipeline import parallelize_pipeline
from distripy.pipelines.unet import parallelize_unet
from distripy.pipelines.vae import parallelize_vae

__all__ = ["parallelize_controlnet", "parallelize_pipeline", "parallelize_unet", "parallelize_vae"]
