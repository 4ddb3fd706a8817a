"""Where a generation starts, and whether a step's conditioning changed, told on the host.

``PatchUNetForward._begin`` must recognise every new generation (missing one would silently reuse
another generation's stale buffers) without reading a timestep that lives on a GPU at every step:
that read waits for the GPU, so the host could never run ahead of it. On CPU a timestep "on the
GPU" is ``DeviceTimestep``: a CPU tensor that says it is on ``cuda`` and records every read of its
value to the host. The band forward is stubbed (these tests are about the wrapper's bookkeeping);
the ``cuda`` test at the end runs a real graphed UNet under ``torch.cuda.set_sync_debug_mode``.
"""

import warnings

import pytest
import torch
from unet_models import sdxl_conditioning, tiny_sdxl_unet

import distripy
from distripy.parallel.generation import UndeclaredGenerationWarning
from distripy.pipelines.unet import require_installed_forward
from distripy.runtime import LoopbackComm

# Tensor methods that copy a tensor's value to the host (on a GPU: wait for it).
_READS = {
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__bool__,
    torch.Tensor.__index__,
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
}


def _to_cpu(args, kwargs) -> bool:
    """Whether ``Tensor.to``'s arguments name the CPU."""
    places = [a for a in list(args) + list(kwargs.values()) if isinstance(a, (str, torch.device))]
    return any(torch.device(place).type == "cpu" for place in places)


# Tensor methods whose result is a view of their input: a view of a DeviceTimestep is one too (an
# element of a schedule on the GPU is on the GPU).
_VIEWS = {
    torch.Tensor.__getitem__,
    torch.Tensor.__iter__,
    torch.Tensor.unbind,
    torch.Tensor.select,
    torch.Tensor.narrow,
    torch.Tensor.expand,
    torch.Tensor.expand_as,
    torch.Tensor.reshape,
    torch.Tensor.view,
    torch.Tensor.squeeze,
    torch.Tensor.unsqueeze,
    torch.Tensor.detach,
}


class DeviceTimestep(torch.Tensor):
    """A CPU tensor standing for one on a GPU: it says it is on ``cuda`` and records, in ``reads``,
    every read of its value to the host. Its views (an element of a schedule) are DeviceTimesteps
    too; what is computed from it is a plain CPU tensor (the cross-rank digest at a generation's
    first step computes on it), whose reads are not seen here: the ``cuda`` test below sees all."""

    reads: list = []

    @staticmethod
    def of(value) -> "DeviceTimestep":
        return torch.as_tensor(value, dtype=torch.float32).as_subclass(DeviceTimestep)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS or (func is torch.Tensor.to and _to_cpu(args[1:], kwargs)):
            cls.reads.append(getattr(func, "__name__", str(func)))
        # a property's getter comes as a new method-wrapper each time: compared by ==
        if func == torch.Tensor.device.__get__:
            return torch.device("cuda", 0)
        if func == torch.Tensor.is_cpu.__get__:
            return False
        if func == torch.Tensor.is_cuda.__get__:
            return True
        if func in _VIEWS:
            return super().__torch_function__(func, types, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


@pytest.fixture(autouse=True)
def _clear_reads():
    DeviceTimestep.reads.clear()
    yield
    DeviceTimestep.reads.clear()


def _stubbed(world_size=2):
    """A parallelised tiny UNet (rank 0 of ``world_size`` on LoopbackComm) whose band forward is
    the identity: only the wrapper's bookkeeping runs."""
    unet = tiny_sdxl_unet(0)
    config = distripy.DistriConfig(mode="corrected_async_gn", warmup_steps=1, split_batch=False)
    distripy.parallelize(unet, config, comm=LoopbackComm(0, world_size))
    forward = require_installed_forward(unet)
    forward.original_forward = lambda sample, **kwargs: (sample * 1,)
    return unet, forward


def _latent(height=32, batch=2):
    return torch.randn(batch, 4, height, 24, generator=torch.Generator().manual_seed(height))


class Steps:
    """Calls the wrapper and records, per call, the generation, the step within it, whether the
    conditioning was to be refreshed, and the host reads of a ``DeviceTimestep``."""

    def __init__(self, forward, conditioning=None) -> None:
        self.forward = forward
        self.conditioning = sdxl_conditioning(2, 1) if conditioning is None else conditioning
        self.seen = []

    def __call__(self, timestep, sample=None, **changes):
        DeviceTimestep.reads.clear()
        sample = _latent() if sample is None else sample
        arguments = dict(self.conditioning, **changes)
        with torch.no_grad():
            self.forward(sample, timestep, return_dict=False, **arguments)
        ctx = self.forward.context
        self.seen.append((ctx.generation, ctx.step, ctx.refresh_conditioning, list(DeviceTimestep.reads)))
        return self.seen[-1]

    def generations(self):
        return [generation for generation, *_ in self.seen]

    def reads_after_first_steps(self):
        """The reads of every step that was not the first of its generation."""
        return [reads for _, step, _, reads in self.seen if step > 0 and reads]


# -- generations -----------------------------------------------------------------------------------


def test_a_declared_generation_reads_no_gpu_timestep_and_ends_at_the_next_reset():
    """After ``reset`` (a pipeline's every call) a GPU timestep that is no schedule element is not
    read: the generation goes on until the next reset, even where the value goes up."""
    unet, forward = _stubbed()
    step = Steps(forward)
    for generation in range(2):
        distripy.reset(unet, 4)
        for value in (999, 700, 800, 100):  # 800 > 700: not read, so not seen; the reset decides
            step(DeviceTimestep.of(value))
    assert step.generations() == [1] * 4 + [2] * 4
    assert step.reads_after_first_steps() == []


def test_a_gpu_schedule_is_followed_without_reading_it():
    """A bare loop over ``scheduler.timesteps`` on the GPU, never reset: each ``t`` is a view into
    the schedule. Same schedule, element not moving back: the same generation; the schedule started
    over, or a new one (even one whose first value is lower than the last: img2img), a new one."""
    unet, forward = _stubbed()
    step = Steps(forward)
    schedule = DeviceTimestep.of(torch.linspace(999, 0, 5))
    for t in schedule:
        step(t)
    step(schedule[4])  # the same element again (a repeated timestep): the same generation
    for t in schedule:  # the same schedule from its start
        step(t)
    for t in schedule[2:]:  # its tail (img2img): an element further back than the last step's
        step(t)
    for t in DeviceTimestep.of([300.0, 200.0, 100.0]):  # a new schedule, below the last value
        step(t)
    assert step.generations() == [1] * 6 + [2] * 5 + [3] * 3 + [4] * 3
    assert step.reads_after_first_steps() == []
    # the schedule element of a batch (``t.expand(batch)``) is an element of the schedule too
    for t in schedule:
        step(t.expand(2))
    assert step.generations()[-5:] == [5] * 5 and step.reads_after_first_steps() == []


def test_a_new_signature_starts_a_generation_whatever_the_timestep():
    unet, forward = _stubbed()
    step = Steps(forward)
    distripy.reset(unet)
    schedule = DeviceTimestep.of(torch.linspace(999, 0, 4))
    step(schedule[0])
    step(schedule[1])
    step(schedule[2], sample=_latent(height=16))  # another latent size, the same schedule
    step(schedule[3], sample=_latent(height=16))
    assert step.generations() == [1, 1, 2, 2] and step.reads_after_first_steps() == []


def test_a_declared_generation_ended_by_a_new_signature_is_no_longer_trusted():
    """Declared by a reset, then a new latent size without one: an undeclared generation begins.
    Its GPU timesteps are not read either (no device-to-host read, ever); the loop is warned, once,
    that it must declare its generations."""
    unet, forward = _stubbed()
    step = Steps(forward)
    distripy.reset(unet)
    step(DeviceTimestep.of(999.0))
    step(DeviceTimestep.of(900.0))
    assert forward.generation.declared
    small = _latent(height=16)
    with pytest.warns(UndeclaredGenerationWarning, match="declare each generation"):
        step(DeviceTimestep.of(999.0), sample=small)
        step(DeviceTimestep.of(800.0), sample=small)
    assert not forward.generation.declared and not forward.generation.agreed
    assert step.generations() == [1, 1, 2, 2]
    assert all(not reads for *_, reads in step.seen)
    distripy.reset(unet, 4)  # declared again: a new generation, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(DeviceTimestep.of(999.0), sample=small)
    assert step.generations()[-1] == 3 and forward.generation.declared and forward.steps == 4


def test_other_gpu_timesteps_are_never_read():
    """Never reset, timesteps that are tensors of their own on the GPU: nothing is read (the host
    never waits for the GPU), the generation goes on while the signature does, and the loop is
    warned once to declare its generations."""
    unet, forward = _stubbed()
    step = Steps(forward)
    with pytest.warns(UndeclaredGenerationWarning) as warned:
        for value in (999, 500, 100, 999, 500):
            step(DeviceTimestep.of(value))
        step(torch.full((2,), 50.0).as_subclass(DeviceTimestep))
    assert len(warned) == 1
    assert step.generations() == [1] * 6
    assert all(not reads for *_, reads in step.seen)


@pytest.mark.parametrize("kind", ["number", "cpu tensor", "cpu schedule"])
def test_numbers_and_cpu_timesteps_start_a_generation_when_they_go_up(kind):
    unet, forward = _stubbed()
    step = Steps(forward)
    values = (999, 600, 300, 900, 100)
    timesteps = {
        "number": list(values),
        "cpu tensor": [torch.tensor(float(v)) for v in values],
        "cpu schedule": list(torch.tensor([float(v) for v in values])),
    }[kind]
    for t in timesteps:
        step(t)
    assert step.generations() == [1, 1, 1, 2, 2]
    distripy.reset(unet)
    step(timesteps[-1])
    assert step.generations()[-1] == 3


def test_a_failed_step_starts_an_undeclared_generation():
    """After a failed step the next call starts a generation, and it is not taken as declared (its
    inputs are checked across ranks again)."""
    unet, forward = _stubbed()
    step = Steps(forward)
    distripy.reset(unet)
    step(DeviceTimestep.of(999.0))
    original = forward.original_forward

    def failing(sample, **kwargs):
        raise RuntimeError("step failed")

    forward.original_forward = failing
    with pytest.raises(RuntimeError, match="step failed"):
        step(DeviceTimestep.of(900.0))
    forward.original_forward = original
    with pytest.warns(UndeclaredGenerationWarning):
        step(DeviceTimestep.of(800.0))
        step(DeviceTimestep.of(700.0))
    assert step.generations() == [1, 2, 2]
    assert not forward.generation.declared


def test_arguments_are_bound_as_the_signature_binds_them():
    """The wrapper binds each layout of positional and keyword arguments once and places later
    calls of that layout itself: the same arguments, in the forward's order, and the same errors."""
    unet, forward = _stubbed()
    sample, conditioning = _latent(), sdxl_conditioning(2, 1)
    embeddings, added = conditioning["encoder_hidden_states"], conditioning["added_cond_kwargs"]
    calls = [
        ((sample, 999), dict(encoder_hidden_states=embeddings, added_cond_kwargs=added)),
        ((sample, 999, embeddings), dict(added_cond_kwargs=added, return_dict=False)),
        ((), dict(added_cond_kwargs=added, timestep=5, sample=sample, encoder_hidden_states=embeddings)),
    ]
    for _ in range(2):  # the first time bound by the signature, then placed
        for args, kwargs in calls:
            expected = forward.__signature__.bind(*args, **kwargs).arguments
            got = forward._bind(args, kwargs)
            assert list(got) == list(expected)
            assert all(got[name] is expected[name] for name in expected)
    for _ in range(2):
        with pytest.raises(TypeError):
            forward._bind((sample, 999), dict(encoder_hidden_states=embeddings, prompt="a cat"))


# -- refresh_conditioning --------------------------------------------------------------------------


def test_refresh_conditioning_at_a_generations_start_and_when_the_conditioning_changes():
    unet, forward = _stubbed()
    conditioning = sdxl_conditioning(2, 1)
    step = Steps(forward, conditioning)
    refresh = []

    def run(**changes):
        refresh.append(step(DeviceTimestep.of(999.0 - len(refresh)), **changes)[2])

    distripy.reset(unet)
    run()  # a generation's first step
    run()  # the same tensors
    embeddings = conditioning["encoder_hidden_states"]
    conditioning["encoder_hidden_states"] = embeddings.clone()  # a new tensor, the same values
    run()
    run()
    conditioning["encoder_hidden_states"].mul_(-1.0)  # changed in place
    run()
    conditioning["added_cond_kwargs"] = dict(conditioning["added_cond_kwargs"])  # new dict, same tensors
    run()
    conditioning["added_cond_kwargs"]["text_embeds"] = conditioning["added_cond_kwargs"]["text_embeds"] + 0
    run()
    run(cross_attention_kwargs={"scale": 0.5})  # another argument
    run(cross_attention_kwargs={"scale": 0.5})
    run(cross_attention_kwargs={"scale": 0.7})
    residual = torch.zeros(2, 4, 32, 24)
    # ControlNet residuals (new tensors every step) are not conditioning
    run(cross_attention_kwargs={"scale": 0.7}, mid_block_additional_residual=residual)
    run(cross_attention_kwargs={"scale": 0.7}, mid_block_additional_residual=residual + 1)
    distripy.reset(unet)
    run(cross_attention_kwargs={"scale": 0.7}, mid_block_additional_residual=residual)  # new generation
    expected = [True, False, True, False, True, False, True, True, False, True, False, False, True]
    assert refresh == expected


def test_refresh_conditioning_every_step_for_inference_tensors():
    """An inference tensor has no version counter: an in-place change cannot be seen."""
    unet, forward = _stubbed()
    with torch.inference_mode():
        step = Steps(forward, sdxl_conditioning(2, 1))
        distripy.reset(unet)
        refresh = [step(DeviceTimestep.of(999.0 - i))[2] for i in range(3)]
    assert refresh == [True, True, True]


# -- on a GPU ------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_replayed_steps_make_no_synchronising_call():
    """A tiny parallel UNet with CUDA graphs on LoopbackComm, a schedule on the GPU, as a pipeline
    runs it: once the steps are captured, a step makes no call that waits for the GPU (the sync
    debug mode raises at one), and the results equal the eager model's."""
    config = dict(mode="corrected_async_gn", warmup_steps=1, split_batch=False)
    models = []
    for use_cuda_graph in (False, True):
        unet = tiny_sdxl_unet(0).cuda()
        distripy.parallelize(
            unet, distripy.DistriConfig(use_cuda_graph=use_cuda_graph, **config), comm=LoopbackComm(1, 2)
        )
        models.append(unet)
    latents = torch.randn(2, 4, 32, 24, generator=torch.Generator().manual_seed(0)).cuda()
    conditioning = {
        "encoder_hidden_states": sdxl_conditioning(2, 7)["encoder_hidden_states"].cuda(),
        "added_cond_kwargs": {k: v.cuda() for k, v in sdxl_conditioning(2, 7)["added_cond_kwargs"].items()},
    }
    schedule = torch.linspace(999, 0, 12, device="cuda")
    outputs = {}
    for name, unet in zip(("eager", "graphed"), models):
        distripy.reset(unet, len(schedule))
        outputs[name] = []
        try:
            with torch.no_grad():
                for i, t in enumerate(schedule):
                    # steps 0-4: synchronous, eager and captures; from step 5 on, replays
                    if name == "graphed" and i == 6:
                        torch.cuda.synchronize()
                        torch.cuda.set_sync_debug_mode("error")
                    noise = unet(latents + 0.01 * i, t, return_dict=False, **conditioning)[0]
                    outputs[name].append(noise.clone())
        finally:
            torch.cuda.set_sync_debug_mode("default")
        distripy.reset(unet)
    graphs = require_installed_forward(models[1]).graphs
    assert graphs.replays >= 6
    for i, (a, b) in enumerate(zip(outputs["eager"], outputs["graphed"])):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"step {i}: {m}")
