"""Predicting how fast a configuration runs, and choosing one: ``distripy plan``.

``traffic`` reads what a rank sends per step from the UNet's config; ``hardware`` says what a GPU
and a fabric do (built in, or measured by ``bench/e2e.py`` and ``bench/comm.py``); ``memory`` what a
rank holds; ``predict`` turns them into one configuration's latency and memory; ``plan`` ranks every
configuration of a machine (leaving out what does not fit its GPUs' memory). Pure
arithmetic on the host: nothing here builds a model or touches a GPU, so ``DistriConfig(
split_batch="auto")`` and the serving engine can ask it per request.
"""

from distripy.planning.hardware import FABRICS, GPUS, Fabric, GpuProfile, fit_gpu, load_fabric, load_gpu
from distripy.planning.memory import MemoryEstimate
from distripy.planning.plan import TOLERANCE, Plan, plan_configurations, resolve_fabric, resolve_gpu
from distripy.planning.predict import Prediction, predict
from distripy.planning.traffic import SDXL_UNET, StepTraffic, band_units, step_traffic

__all__ = [
    "FABRICS",
    "GPUS",
    "SDXL_UNET",
    "TOLERANCE",
    "Fabric",
    "GpuProfile",
    "MemoryEstimate",
    "Plan",
    "Prediction",
    "StepTraffic",
    "band_units",
    "fit_gpu",
    "load_fabric",
    "load_gpu",
    "plan_configurations",
    "predict",
    "resolve_fabric",
    "resolve_gpu",
    "step_traffic",
]
