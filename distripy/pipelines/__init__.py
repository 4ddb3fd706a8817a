"""Diffusers pipeline glue: a patch-parallel pipeline call and a patch-parallel VAE decode."""

from distripy.pipelines.pipeline import parallelize_pipeline
from distripy.pipelines.vae import PatchDecoderForward, parallelize_vae

__all__ = ["PatchDecoderForward", "parallelize_pipeline", "parallelize_vae"]
