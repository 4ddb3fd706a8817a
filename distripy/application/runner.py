"""``RequestRunner``: one ``GenerationRequest`` applied to a loaded pipeline and run, on every rank
(or on one rank alone). What changes between requests without a restart: the task's pipeline
(text-to-image, img2img, inpainting, each with or without the ControlNets: ``from_pipe`` of the
loaded one, sharing its parallelised models), the scheduler and its timestep spacing, the mode,
the active LoRAs (each file loaded once, under the adapter name of its path), then the refiner
from the request's ``refiner_start``.
"""

import contextlib
import inspect
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from distripy.application.checks import NO_LABELS
from distripy.application.loader import LoadedPipeline, load, load_lora
from distripy.application.progress import StepProgress
from distripy.application.request import REFINER_START, GenerationRequest, adapter_names
from distripy.application.spec import PipelineSpec
from distripy.errors import InputError

__all__ = ["RequestRunner"]

_TASKS = {"text2img": "AutoPipelineForText2Image", "img2img": "AutoPipelineForImage2Image",
          "inpaint": "AutoPipelineForInpainting"}  # fmt: skip


def _image(value: Any, mode: str = "RGB"):
    """A PIL image in ``mode`` from an image or an image file's path."""
    from PIL import Image

    if isinstance(value, (str, Path)):
        with Image.open(value) as image:
            return image.convert(mode)
    return value.convert(mode)


def image_arguments(request: GenerationRequest, refine: bool) -> Dict[str, Any]:
    """The call's images, size and strength, as the task's pipeline names them."""
    arguments: Dict[str, Any] = dict(height=request.height, width=request.width)
    controls = [_image(image) for image in request.control_images]
    control = None if not controls else controls[0] if len(controls) == 1 else controls
    if request.init_image is not None:
        arguments["image"] = _image(request.init_image)
        if request.mask_image is not None:
            arguments["mask_image"] = _image(request.mask_image, "L")
        if control is not None:
            arguments["control_image"] = control
        if request.strength is not None:
            arguments["strength"] = request.strength
    elif control is not None:
        arguments["image"] = control
    if refine:
        arguments.update(denoising_end=_refiner_start(request), output_type="latent")
    return arguments


def _refiner_start(request: GenerationRequest) -> float:
    return REFINER_START if request.refiner_start is None else request.refiner_start


def call(pipe, arguments: Dict[str, Any], extra: Dict[str, Any]) -> list:
    """Call ``pipe`` with the arguments its ``__call__`` takes (img2img pipelines have no height
    and width: the image's size is kept) and every ``extra`` one; its images."""
    accepted = inspect.signature(pipe.__call__).parameters
    for name in ("denoising_end", "denoising_start"):
        if name in arguments and name not in accepted:
            raise InputError(f"{type(pipe).__name__} takes no {name} (the refiner cannot follow it)")
    given = {name: value for name, value in arguments.items() if name in accepted and value is not None}
    return pipe(**given, **extra).images


class RequestRunner:
    """Requests on one loaded pipeline (module docstring). Every rank makes the same calls in the
    same order, except inside ``alone()``, where each runs its own."""

    def __init__(self, loaded: LoadedPipeline) -> None:
        self.loaded = loaded
        base = loaded.pipe
        self._scheduler_config = base.scheduler.config
        self._own_scheduler = base.scheduler
        self._schedulers: Dict[Tuple[str, Optional[str]], Any] = {("default", None): base.scheduler}
        self._tasks: Dict[Tuple[str, bool], Any] = {("text2img", False): base}
        if loaded.controlnet_pipe is not None:
            self._tasks[("text2img", True)] = loaded.controlnet_pipe
        config = loaded.spec.config
        self.default_mode = (config.mode, config.warmup_steps)
        self.mode = self.default_mode
        self._alone: Optional[contextlib.ExitStack] = None

    @classmethod
    def start(
        cls, spec: PipelineSpec, progress_bar: bool = False, labels: Mapping[str, str] = NO_LABELS
    ) -> "RequestRunner":
        """Load ``spec`` on this rank (``application.loader.load``) and run requests on it."""
        return cls(load(spec, progress_bar, labels))

    @property
    def geometry(self):
        """The loaded model's ``BandGeometry``."""
        return self.loaded.geometry

    @property
    def pipe(self):
        """The model's own pipeline, parallelised."""
        return self.loaded.pipe

    def pipelines(self) -> List[Any]:
        """Every pipeline made so far (the tasks' and the refiner)."""
        pipes = list(self._tasks.values()) + (
            [self.loaded.refiner] if self.loaded.refiner is not None else []
        )
        return list({id(pipe): pipe for pipe in pipes}.values())

    # -- what a request changes ------------------------------------------------------------------

    def _task(self, task: Tuple[str, bool]):
        """The pipeline of ``task``: ``from_pipe`` of the loaded one (the same, parallelised,
        models), made at its first use."""
        if task in self._tasks:
            return self._tasks[task]
        import diffusers

        import distripy

        kind, controlled = task
        if controlled and self.loaded.controlnet is None:
            raise InputError("control_images: this pipeline has no ControlNet (give the spec controlnets)")
        extra = {"controlnet": self.loaded.controlnet} if controlled else {}
        auto = getattr(diffusers, _TASKS[kind])
        try:
            pipe = auto.from_pipe(self.loaded.pipe, **extra)
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(f"{type(self.loaded.pipe).__name__} has no {kind} pipeline ({error})") from None
        if not self.loaded.progress_bar:
            pipe.set_progress_bar_config(disable=True)
        pipe = distripy.parallelize(pipe, self.loaded.spec.config)  # its models are already
        if self._alone is not None:
            self._alone.enter_context(distripy.alone(pipe))
        self._tasks[task] = pipe
        return pipe

    def _scheduler(self, name: str, spacing: Optional[str]):
        """The scheduler ``name`` (``default``: the model's own) with ``spacing``, made from the
        model's scheduler configuration once."""
        key = (name, spacing)
        if key not in self._schedulers:
            import diffusers

            from distripy.pipelines.schedulers import scheduler_class_name

            class_name = scheduler_class_name(name)
            cls = type(self._own_scheduler) if class_name is None else getattr(diffusers, class_name)
            overrides = {} if spacing is None else {"timestep_spacing": spacing}
            self._schedulers[key] = cls.from_config(self._scheduler_config, **overrides)
        return self._schedulers[key]

    def _set_mode(self, mode: Optional[str], warmup_steps: Optional[int]) -> None:
        """The request's mode and warm-up; the spec's configuration's where it names none."""
        import distripy

        wanted = (
            mode or self.default_mode[0],
            self.default_mode[1] if warmup_steps is None else warmup_steps,
        )
        if wanted != self.mode:
            for pipe in self.pipelines():
                distripy.reconfigure(pipe, mode=wanted[0], warmup_steps=wanted[1])
            self.mode = wanted

    def _load_adapters(self, names: List[Tuple[str, str]]) -> None:
        for name, path in names:
            if name not in self.loaded.adapters:
                load_lora(self.loaded.pipe, path, name)
                self.loaded.adapters[name] = path

    def _set_loras(self, loras) -> None:
        names = adapter_names(loras)
        self._load_adapters(names)
        pipe = self.loaded.pipe
        if names:
            pipe.enable_lora()
            pipe.set_adapters([name for name, _ in names], [scale for _, scale in loras])
        elif self.loaded.adapters:
            pipe.disable_lora()

    def prepare(self, requests: List[GenerationRequest]) -> None:
        """Make what ``requests`` need (their LoRAs, their tasks' pipelines) on this rank: before
        the ranks run different requests alone, every rank prepares all of them, so that the ranks
        keep the same adapters and pipelines whatever each ran."""
        for request in requests:
            self._load_adapters(adapter_names(request.loras))
            self._task(request.task)

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        """Inside, each call runs on this rank by itself (``distripy.alone`` of every pipeline)."""
        import distripy

        with contextlib.ExitStack() as stack:
            for pipe in self.pipelines():
                stack.enter_context(distripy.alone(pipe))
            self._alone = stack
            try:
                yield
            finally:
                self._alone = None

    # -- running ---------------------------------------------------------------------------------

    def run(
        self,
        request: GenerationRequest,
        progress: Optional[Callable[[int, Optional[int]], None]] = None,
        timer: Optional[StepProgress] = None,
    ) -> list:
        """The request's images (PIL). ``progress(step, total)`` after each step (rank 0's
        report; the others pass None); ``timer``: the step callback to use instead."""
        import torch

        pipe = self._task(request.task)
        pipe.scheduler = self._scheduler(request.scheduler, request.timestep_spacing)
        self._set_mode(request.mode, request.warmup_steps)
        self._set_loras(request.loras)
        refiner = self.loaded.refiner
        callback = timer if timer is not None else StepProgress(progress, request.steps)
        common: Dict[str, Any] = dict(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            callback_on_step_end=callback,
        )
        if request.seed is not None:
            common["generator"] = torch.Generator().manual_seed(int(request.seed))
        extra = dict(request.extra)
        output_type = extra.pop("output_type", "pil")
        arguments = {**common, "output_type": output_type, **image_arguments(request, refiner is not None)}
        images = call(pipe, arguments, extra)
        if refiner is not None:
            refined = dict(
                common, image=images, denoising_start=_refiner_start(request), output_type=output_type
            )
            images = call(refiner, refined, extra)
        return list(images)
