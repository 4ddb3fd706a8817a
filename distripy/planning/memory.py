"""Predicted peak memory of one rank: what ``distripy plan --memory`` leaves out.

A rank holds, at its peak (bytes):

* **weights**: the whole pipeline's parameters (every rank holds all of them): SDXL's published
  parameter counts by default (``SDXL_PARAMETERS``), at the weights' dtype;
* **persistent**: what the patch modules keep across steps (``parallel.buffers``). Without CUDA
  graphs that is the asynchronous modes' stale buffers (``StepTraffic.kept_bytes``: the freshly
  exchanged values replace them module by module, so one set is alive at a time), or a residual
  codec's baselines in ``full_sync`` and ``exact`` (nothing else of theirs). With CUDA graphs
  it is every exchange's persistent buffers, one per step parity, for every kind of step the mode
  runs (the warm-up's and the stale steps'), a compressed exchange's shared buffers (its packed
  bytes and, for a residual codec, its own baseline), and each cross-attention's keys and values of
  the prompt (``persistent_bytes``; ``tests/test_planning.py`` checks it against the buffers a
  parallelised model allocates);
* **activations**: one band step's working memory (``unet_activation_bytes``: the skip connections
  alive until the up blocks, plus the largest layer's working set, with the attention's own
  keys and values gathered over the image in a synchronous step), and with CUDA graphs once more:
  the graphs' private memory pool keeps a step's working memory for its replays;
* **the VAE decode** of the band (``vae_decode_bytes``: the decoder's largest working set at the
  image's resolution, in float32 as SDXL's VAE upcasts, and its mid-block attention's keys and
  values of the whole image), which runs after the steps: the peak is the larger of the two.

The activation and decode terms are estimates of diffusers' modules (``ACTIVATION_COPIES``,
``VAE_DECODE_COPIES``), assumed until ``bench/e2e.py``'s peak memory per row measures them; the
persistent term is exact for the modules distripy swaps in.
"""

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

from distripy.errors import InputError
from distripy.planning.traffic import SDXL_UNET, StepTraffic, band_rows, level_columns, unet_blocks

__all__ = [
    "ACTIVATION_COPIES",
    "GIB",
    "SDXL_PARAMETERS",
    "SDXL_VAE",
    "TEXT_TOKENS",
    "VAE_DECODE_COPIES",
    "MemoryEstimate",
    "persistent_bytes",
    "unet_activation_bytes",
    "vae_decode_bytes",
]

GIB = 1024**3
"""``--memory`` is in GiB, as cards are sold: a "24 GB" card has 24 GiB."""

SDXL_PARAMETERS: Dict[str, int] = {
    "unet": 2_567_463_684,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
    "vae": 83_653_863,
}
"""``stabilityai/stable-diffusion-xl-base-1.0``'s parameters per model (``tests/test_planning.py``
counts them on ``meta`` from the models' configurations)."""

SDXL_VAE: Dict = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4}
"""SDXL's ``AutoencoderKL``, the fields the decode estimate reads."""

TEXT_TOKENS = 77
"""The prompt's tokens (CLIP's context): the length of each cross-attention's keys and values."""

ACTIVATION_COPIES = {"resnet": (2, 3), "transformer": 18, "gathered": 2}
"""A band step's working set per layer, in copies of the layer's activation: a ResNet block holds
its input and its normalised input (``2 x`` the input channels) and its convolutions' outputs, the
shortcut's and the sum (``3 x`` the output channels); a transformer layer its hidden states, their
norm, queries, keys, values and the attention's output (6) and the feed-forward's GEGLU projection
and product (12: 8 and 4 channels per channel); a synchronous step's self-attention the keys and
values of the whole image (2 copies of the image's tokens)."""

VAE_DECODE_COPIES = 6
"""The decoder's working set in its last (full-resolution) up block, in copies of its input
channels: the upsampled input, its normalised copy, the convolutions' outputs and the sum."""


@dataclass(frozen=True)
class MemoryEstimate:
    """One rank's predicted memory (bytes) and its parts (module docstring)."""

    weights: int
    persistent: int
    activations: int
    graph_pool: int
    vae_decode: int

    @property
    def peak(self) -> int:
        return self.weights + self.persistent + self.graph_pool + max(self.activations, self.vae_decode)

    def as_dict(self) -> Dict:
        gib = {name: getattr(self, name) / GIB for name in ("weights", "persistent", "activations", "graph_pool")}
        return {"peak_gib": self.peak / GIB, **{f"{k}_gib": v for k, v in gib.items()},
                "vae_decode_gib": self.vae_decode / GIB}  # fmt: skip

    def describe(self) -> str:
        """``"31.2 GiB: weights 6.5, kept 1.2, step 3.1, graph pool 3.1, VAE decode 2.0"``."""
        parts = [("weights", self.weights), ("kept", self.persistent), ("step", self.activations)]
        if self.graph_pool:
            parts.append(("graph pool", self.graph_pool))
        parts.append(("VAE decode", self.vae_decode))
        return f"{self.peak / GIB:.1f} GiB: " + ", ".join(f"{name} {value / GIB:.1f}" for name, value in parts)


def persistent_bytes(
    walks: Sequence[StepTraffic], graphs: bool, keeps: bool, statistics: bool, text_tokens: int = TEXT_TOKENS
) -> int:
    """What one rank's patch modules keep across steps, from the walks of every kind of step the
    mode runs (``step_traffic``: the synchronous and, compressed or not, the asynchronous step; or
    the ``full_sync`` / ``exact`` step, and its compressed step after the warm-up). ``keeps``: the
    mode reads the last step's activations (``parallel.step_policy.keeps_activations``),
    ``statistics`` its GroupNorm sums too.

    Without ``graphs``: the stale buffers (``kept_bytes`` of the asynchronous step), or a fresh
    exchange's residual baselines. With
    ``graphs`` (``parallel.buffers``: one persistent buffer per module, name and step parity, both
    parities in use once two steps of a kind have run): each halo's received rows, each GroupNorm's
    image and band sums, each self-attention's gathered keys and values, or an ``exact`` step's
    received blocks, per parity (``fp8``: one buffer for both, its stale steps update it in place;
    a residual codec: none, it keeps its baselines in fp8); what a synchronous step sends of its
    keys and values, a compressed exchange's shared buffers and each cross-attention's keys and
    values of the prompt (``text_tokens``), once."""
    if not walks:
        raise InputError("persistent_bytes: no step walks given")
    compressed = next((walk for walk in walks if walk.compress != "none"), None)
    if not graphs:
        if not keeps:  # full_sync, exact: a residual codec's baselines
            return 0 if compressed is None else compressed.fresh_kept_bytes()
        return (compressed or walks[-1]).kept_bytes(statistics)
    total = 0
    uncompressed = next((walk for walk in walks if walk.compress == "none"), walks[0])
    # the gathered keys and values and what is sent of them in a synchronous step: uncompressed,
    # one per parity (and one send buffer, read within its step); fp8's stale steps update the
    # warm-up's in place (one buffer for both parities); a residual codec keeps only its baselines,
    # in fp8 (its synchronous step's are the step's own). A fresh exchange's compressed steps use
    # buffers of their own step: its warm-up's are the uncompressed exchange's
    codec = "none" if compressed is None or compressed.fresh else compressed.compress
    gathered_sets, send_sets = {"none": (2, 1), "fp8": (1, 1)}.get(codec, (0, 0))
    for transfer in uncompressed.transfers:
        if transfer.kind == "halo":
            total += 2 * transfer.received
        elif transfer.kind == "gn_stats":
            total += 2 * 2 * transfer.sent  # the image's sums and the band's, per parity
        elif transfer.kind == "kv" and transfer.op == "all_gather":
            total += gathered_sets * (transfer.sent + transfer.received) + send_sets * transfer.sent
        elif transfer.kind == "kv":  # exact: the block received from each other band
            total += 2 * transfer.received
    for walk in walks:
        total += sum(t.shared for t in walk.transfers)
    # the prompt's keys and values, per transformer layer (one cross-attention each)
    total += sum(walk.context_bytes(text_tokens) for walk in walks[:1])
    return total


def unet_activation_bytes(
    latent: Tuple[int, int],
    batch: int,
    units: Sequence[int],
    index: int,
    config: Optional[Mapping] = None,
    dtype_bytes: int = 2,
    synchronous: bool = True,
) -> int:
    """One band step's working memory (``ACTIVATION_COPIES``): the down blocks' outputs kept for
    the up blocks, plus the largest layer's working set (a ResNet block's or a transformer layer's,
    with the whole image's keys and values in a ``synchronous`` step)."""
    channels, layers, depth = unet_blocks(SDXL_UNET if config is None else config)
    levels = len(channels)
    height, width = latent
    whole = (sum(units),)  # the image as one band

    def elements(level: int) -> Tuple[int, int]:
        """(the band's elements per channel, the image's) at ``level``."""
        per_row = batch * level_columns(width, level)
        return band_rows(height, units, index, level) * per_row, band_rows(height, whole, 0, level) * per_row

    skips = channels[0] * elements(0)[0]  # conv_in
    working = 0
    resnet_in, resnet_out = ACTIVATION_COPIES["resnet"]
    for level, kind in enumerate(config["down_block_types"]):
        band, image = elements(level)
        inner = channels[max(level - 1, 0)]
        skips += layers[level] * channels[level] * band
        if level < levels - 1:
            skips += channels[level] * elements(level + 1)[0]
        working = max(working, (resnet_in * inner + resnet_out * channels[level]) * band)
        if "CrossAttn" in kind and depth[level]:
            gathered = ACTIVATION_COPIES["gathered"] * channels[level] * image if synchronous else 0
            working = max(working, ACTIVATION_COPIES["transformer"] * channels[level] * band + gathered)
    for level in range(levels):  # the up blocks: the concatenated input of each ResNet block
        band, _ = elements(level)
        above = channels[min(level + 1, levels - 1)]
        working = max(working, (resnet_in * (above + channels[level]) + resnet_out * channels[level]) * band)
    return (skips + working) * dtype_bytes


def vae_decode_bytes(
    latent: Tuple[int, int], batch: int, bands: int, vae: Optional[Mapping] = None, dtype_bytes: int = 4
) -> int:
    """The band decode's working memory (``VAE_DECODE_COPIES``): the last up block's at the image's
    resolution (the band's share of the image's rows), and the mid-block attention's keys and values
    of the whole image at the latent's resolution. Decoded one image at a time (``batch`` images of
    the call decoded together)."""
    vae = SDXL_VAE if vae is None else vae
    channels = list(vae["block_out_channels"])
    scale = 1 << (len(channels) - 1)
    rows, columns = latent
    band_pixels = -(-rows * scale // bands) * columns * scale
    last = VAE_DECODE_COPIES * channels[1] * band_pixels  # the upsampled input of the last up block
    attention = 2 * channels[-1] * rows * columns  # the whole latent's keys and values
    return batch * (last + attention) * dtype_bytes
