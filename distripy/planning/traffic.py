"""What one rank of a patch-parallel UNet step sends, read from the UNet's config: no model built.

The walk follows diffusers' ``UNet2DConditionModel`` (its blocks' channel rules) and distripy's
modules: every convolution with a kernel taller than one row exchanges halo rows (one above and one
below for a 3x3; a stride-2 downsampler only needs the row above) -- except ``conv_in``, which
reads its halos from the latent every rank holds; every GroupNorm all-reduces ``(B, G, 2)`` fp32
sums; every self-attention all-gathers its keys and values side by side, one all-gather per batch
item (``exact``: ring shifts of both, one per other band); the step ends with the all-gather of the output bands. Unequal bands send blocks padded
to the tallest band (``parallel.bands``). The transfers of one down/mid/up block leave together at
the block's end in an asynchronous step (``PatchContext.add_checkpoints``), those after the last
block at the step's end.

``tests/test_planning.py`` checks the walk against what a ``LoopbackComm`` logs while the real
model runs.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from distripy.errors import InputError

__all__ = [
    "SDXL_UNET",
    "StepTraffic",
    "Transfer",
    "band_rows",
    "band_units",
    "level_columns",
    "packed_bytes",
    "step_traffic",
    "unet_blocks",
]

SDXL_UNET: Dict = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "norm_num_groups": 32,
}
"""Stable Diffusion XL's UNet (``stabilityai/stable-diffusion-xl-base-1.0``), the fields the walk
reads."""


@dataclass(frozen=True)
class Transfer:
    """One transfer of a step: ``op`` (``halo_exchange``, ``all_reduce``, ``all_gather``,
    ``shift``), ``kind`` (``halo``, ``gn_stats``, ``kv``, ``output``), the bytes this rank puts on
    the link (``sent``) and takes off it (``received``; an all-reduce counts its payload both
    ways), ``block``: the checkpoint it leaves at in an asynchronous step, and for compressed keys
    and values ``codec_bytes``, the bytes the encoder and the decoders move in memory, ``kept``,
    the bytes the module keeps for the next step (``parallel.compression``: the packed bytes
    received, and fp8's whole image's keys and values or a residual's baselines in fp8), and
    ``shared``, the buffers of a compressed exchange that both step parities share under CUDA
    graphs (those, and the packed bytes sent; ``planning.memory``)."""

    op: str
    kind: str
    sent: int
    received: int
    block: int
    codec_bytes: int = 0  # the memory the codecs read and write to send and receive it (compressed)
    kept: int = 0  # compressed keys/values: what the module keeps for the next step
    shared: int = 0  # compressed keys/values: the buffers both step parities share (graphs)


@dataclass(frozen=True)
class StepTraffic:
    """One rank's transfers in one step, how many checkpoints (blocks) the step has, and whether
    it is an ``exact`` step (halos overlapped with the interior, keys and values by ring shifts)."""

    transfers: Tuple[Transfer, ...]
    blocks: int
    exact: bool = False
    attention_channels: Tuple[int, ...] = ()  # each transformer layer's channels, in order
    batch: int = 1  # images per band
    dtype_bytes: int = 2
    compress: str = "none"  # the codec of its keys and values
    fresh: bool = False  # its keys and values are this step's (full_sync, exact), not the last step's

    def bytes_by_kind(self) -> Dict[str, int]:
        totals = {"halo": 0, "gn_stats": 0, "kv": 0, "output": 0}
        for transfer in self.transfers:
            totals[transfer.kind] += transfer.sent
        return totals

    def kept_bytes(self, statistics: bool = True) -> int:
        """The bytes this rank keeps from a step for the next in a mode whose later steps read the
        previous step's values (the asynchronous modes: their stale buffers): each convolution's
        received halo rows, each self-attention's keys and values of every band (the whole
        all-gather; compressed, ``Transfer.kept``), and with ``statistics`` (``corrected_async_gn``, ``stale_gn``) each
        GroupNorm's image and band sums (twice the all-reduce's payload); nothing of the output.
        With CUDA graphs there are two such sets, one per step parity. ``full_sync`` and ``exact``
        keep nothing (``parallel.step_policy.keeps_activations``) but a residual codec's baselines
        (``fresh_kept_bytes``)."""
        if self.fresh:
            return self.fresh_kept_bytes()
        kept = 0
        for transfer in self.transfers:
            if transfer.kind == "halo":
                kept += transfer.received
            elif transfer.kind == "gn_stats" and statistics:
                kept += 2 * transfer.sent
            elif transfer.kind == "kv" and transfer.op == "all_gather":
                kept += transfer.kept or transfer.sent + transfer.received
        return kept

    def fresh_kept_bytes(self) -> int:
        """What a step of fresh exchanges (``full_sync``, ``exact``) keeps for the next: a residual
        codec's baselines of every band, in fp8 (``Transfer.kept``); nothing otherwise."""
        return sum(t.kept for t in self.transfers)

    def context_bytes(self, text_tokens: int) -> int:
        """The prompt's keys and values of every cross-attention (one per transformer layer), kept
        once under CUDA graphs (``PatchCrossAttnProcessor``): ``text_tokens`` each."""
        return sum(self.batch * text_tokens * 2 * channels * self.dtype_bytes for channels in self.attention_channels)

    def count_by_kind(self) -> Dict[str, int]:
        counts = {"halo": 0, "gn_stats": 0, "kv": 0, "output": 0}
        for transfer in self.transfers:
            counts[transfer.kind] += 1
        return counts


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 4) * 4


def packed_bytes(rows: int, cols: int, compress: str) -> int:
    """The bytes one ``rows x cols`` tensor travels as under ``compress`` (``DistriConfig.compress``;
    ``kernels.residual_codec.ResidualLayout``, ``kernels.fp8_codec.Fp8Layout``: this layer does not
    import the kernels; ``tests/test_compressed_exchange.py`` checks the two agree through what a
    model's transfers log): fp32 scales per row (and per column for a residual), then the codes."""
    if compress == "fp8":
        return 4 * rows + _aligned(rows * cols)
    bits = {"residual2": 2, "residual1": 1}.get(compress)
    if bits is None:
        raise InputError(f"packed_bytes: compress {compress!r} is not a codec (fp8, residual2, residual1)")
    per_byte = 8 // bits
    return 4 * rows + 4 * cols + _aligned(rows * -(-cols // per_byte))


def band_units(total: int, count: int) -> Tuple[int, ...]:
    """``total`` deepest-level rows cut into ``count`` bands differing by at most one, the larger
    first: the cut the ranks make (``parallel.bands.BandLayout.split``) and the planner assumes."""
    base, extra = divmod(total, count)
    return tuple(base + 1 if index < extra else base for index in range(count))


def band_rows(latent_rows: int, units: Sequence[int], band: int, level: int) -> int:
    """Band ``band``'s rows at ``level`` (0: the latent's), of bands of ``units`` deepest-level rows."""
    return (latent_rows >> level) // sum(units) * units[band]


def level_columns(latent_columns: int, level: int) -> int:
    """The columns at ``level`` (each downsampling halves them, rounding up)."""
    return -(-latent_columns // (1 << level))


def unet_blocks(config: Dict) -> Tuple[List[int], List[int], List[int]]:
    """A UNet config's channels per level, ResNet layers per down block and transformer layers per
    level, one entry each."""
    channels = list(config["block_out_channels"])
    levels = len(channels)
    layers = _per_block(config.get("layers_per_block", 2), levels, "layers_per_block")
    depth = _per_block(config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    return channels, layers, depth


def _per_block(value, blocks: int, name: str) -> List:
    if isinstance(value, int):
        return [value] * blocks
    value = list(value)
    if len(value) != blocks:
        raise InputError(f"UNet config: {name} has {len(value)} entries for {blocks} blocks")
    return value


class _Walk:
    """Adds the transfers of each module, at its level (0: the latent's resolution)."""

    def __init__(self, height, width, batch, units, index, dtype_bytes, exact, halves, compress, fresh) -> None:
        self.height, self.width, self.batch, self.halves = height, width, batch, halves
        self.compress, self.fresh = compress, fresh
        self.units, self.index = tuple(units), index
        self.bytes = dtype_bytes
        self.exact = exact
        self.block = 0
        self.transfers: List[Transfer] = []
        self.attention_channels: List[int] = []

    def traffic(self, blocks: int) -> StepTraffic:
        return StepTraffic(
            tuple(self.transfers), blocks, self.exact, tuple(self.attention_channels), self.batch, self.bytes,
            self.compress, self.fresh,
        )  # fmt: skip

    def rows(self, level: int, band: Optional[int] = None) -> int:
        """A band's rows at ``level`` (rows per unit x its units)."""
        return band_rows(self.height, self.units, self.index if band is None else band, level)

    def columns(self, level: int) -> int:
        return level_columns(self.width, level)

    def add(self, op, kind, sent, received, codec_bytes=0, kept=0, shared=0) -> None:
        self.transfers.append(Transfer(op, kind, sent, received, self.block, codec_bytes, kept, shared))

    def conv(self, channels: int, level: int, above: int = 1, below: int = 1) -> None:
        """A convolution reading ``above`` rows over its band and ``below`` under it; it sends its
        first ``below`` rows up and its last ``above`` rows down."""
        first, last = self.index == 0, self.index == len(self.units) - 1
        row = self.batch * channels * self.columns(level) * self.bytes
        sent = (0 if first else below) + (0 if last else above)
        received = (0 if first else above) + (0 if last else below)
        if sent or received:
            self.add("halo_exchange", "halo", sent * row, received * row)

    def norm(self, groups: int) -> None:
        size = self.batch * groups * 2 * 4  # (B, G, [sum, sum of squares]) in fp32
        self.add("all_reduce", "gn_stats", size, size)

    def self_attention(self, channels: int, level: int) -> None:
        self.attention_channels.append(channels)
        tallest = max(self.rows(level, band) for band in range(len(self.units)))
        item = tallest * self.columns(level) * 2 * channels * self.bytes  # keys | values, one item
        others = len(self.units) - 1
        if self.compress != "none":
            self._compressed_attention(channels, level, tallest, item, others)
        elif self.exact:  # keys and values together, one shift per other band
            for _ in range(others):
                self.add("shift", "kv", self.batch * item, self.batch * item)
        else:  # keys and values side by side, one all-gather per batch item (batch-major)
            for _ in range(self.batch):
                self.add("all_gather", "kv", item, item * others)

    def _compressed_attention(self, channels: int, level: int, tallest: int, item: int, others: int) -> None:
        """Every item packed (``parallel.compression``): one all-gather, or in ``exact`` one shift
        per other band; the codecs' memory traffic, and what the module keeps."""
        own = self.rows(level) * self.columns(level)  # tokens
        tall = tallest * self.columns(level)
        slot = packed_bytes(tall, 2 * channels, self.compress)
        width = 2 * channels * self.bytes
        received = self.batch * (others + 1) * slot  # every band's slot, its own included
        if self.compress.startswith("residual"):
            # the baselines, every band's, kept in fp8; a step takes another band's change in one
            # kernel (kernels.residual_fp8_decode): its two passes read the baseline's bytes (a
            # byte an element) and the change's, the second writes the values and the new bytes;
            # its own: decoded, encoded against (values and baseline read, baseline and bytes
            # written), stored back
            store = self.batch * (others + 1) * packed_bytes(tall, 2 * channels, "fp8")
            elements = 2 * channels
            per_other = tall * (width + 3 * elements) + 2 * slot
            codec = self.batch * (own * (5 * width + 2 * elements) + slot + others * per_other)
            if self.fresh:  # only the baselines outlive the step
                kept = shared = store
            else:
                kept, shared = store + received, store + self.batch * slot + received
        else:  # fp8: each band's values written over its slot
            codec = self.batch * (2 * own * width + slot + others * (tall * width + slot))
            if self.fresh:  # nothing outlives the step
                kept = shared = 0
            else:  # the whole image's keys and values kept
                kept = self.batch * (others + 1) * item + received
                shared = self.batch * slot + received
        if self.exact:  # one shift per other band; the codecs and the baselines on the first
            for other in range(others):
                first = other == 0
                self.add("shift", "kv", self.batch * slot, self.batch * slot, codec * first, kept * first, shared * first)
        else:
            self.add("all_gather", "kv", self.batch * slot, self.batch * slot * others, codec, kept, shared)

    def resnet(self, channels_in: int, channels_out: int, level: int, groups: int) -> None:
        self.norm(groups)
        self.conv(channels_in, level)
        self.norm(groups)
        self.conv(channels_out, level)

    def transformer(self, channels: int, level: int, layers: int, groups: int) -> None:
        self.norm(groups)
        for _ in range(layers):
            self.self_attention(channels, level)

    def output(self, channels: int) -> None:
        tallest = max(self.rows(0, band) for band in range(len(self.units)))
        size = self.batch * channels * tallest * self.width * self.bytes
        # over every rank of the image: both batch halves' groups with the CFG split
        self.add("all_gather", "output", size, size * (self.halves * len(self.units) - 1))


def step_traffic(
    latent: Tuple[int, int],
    batch: int,
    units: Sequence[int],
    index: int,
    config: Optional[Dict] = None,
    dtype_bytes: int = 2,
    exact: bool = False,
    halves: int = 1,
    compress: str = "none",
    fresh: bool = False,
) -> StepTraffic:
    """The transfers of band ``index`` of a step whose latent is ``latent`` (rows, columns), with
    ``batch`` images per band (half the CFG batch with the split), bands of ``units`` deepest-level
    rows (``BandLayout.units``), a UNet of ``config`` (default ``SDXL_UNET``), ``dtype_bytes`` per
    activation; ``exact``: keys and values by ring shifts; ``halves``: 2 with the CFG split (the
    output is gathered from both groups); ``compress``: the step's keys and values under that codec
    (``DistriConfig.compress``: a step after the warm-up; the warm-up steps send them uncompressed);
    ``fresh``: they are this step's, exchanged fresh (``full_sync``; ``exact`` always is), not an
    asynchronous step's stale ones."""
    config = SDXL_UNET if config is None else config
    channels, layers, depth = unet_blocks(config)
    levels = len(channels)
    height, width = latent
    if height % ((1 << (levels - 1)) * sum(units)):
        raise InputError(f"step_traffic: latent height {height} is not whole rows of bands {tuple(units)}")
    groups = config.get("norm_num_groups", 32)
    walk = _Walk(height, width, batch, units, index, dtype_bytes, exact, halves, compress, fresh or exact)
    if len(units) == 1:  # one band: nothing between bands; the halves' outputs are gathered
        if halves > 1:
            walk.output(config.get("out_channels", 4))
        return walk.traffic(2 * levels + 2)

    for i, kind in enumerate(config["down_block_types"]):  # conv_in: halos from the latent itself
        inner, outer = channels[max(i - 1, 0)], channels[i]
        for j in range(layers[i]):
            walk.resnet(inner if j == 0 else outer, outer, i, groups)
            if "CrossAttn" in kind:
                walk.transformer(outer, i, depth[i], groups)
        if i < levels - 1:
            walk.conv(outer, i, above=1, below=0)  # stride 2: the row above only
        walk.block += 1

    deepest, width_deep = levels - 1, channels[-1]
    walk.resnet(width_deep, width_deep, deepest, groups)
    if "CrossAttn" in config.get("mid_block_type", "UNetMidBlock2DCrossAttn"):
        walk.transformer(width_deep, deepest, depth[-1], groups)
        walk.resnet(width_deep, width_deep, deepest, groups)
    walk.block += 1

    reversed_channels = channels[::-1]
    up_layers = layers[::-1]
    up_depth = list(config.get("reverse_transformer_layers_per_block") or depth[::-1])
    output_channels = reversed_channels[0]
    for i, kind in enumerate(config["up_block_types"]):
        level = levels - 1 - i
        previous, output_channels = output_channels, reversed_channels[i]
        skip_in = reversed_channels[min(i + 1, levels - 1)]
        count = up_layers[i] + 1
        for j in range(count):
            skip = skip_in if j == count - 1 else output_channels
            walk.resnet((previous if j == 0 else output_channels) + skip, output_channels, level, groups)
            if "CrossAttn" in kind:
                walk.transformer(output_channels, level, up_depth[i], groups)
        if i < levels - 1:
            walk.conv(output_channels, level - 1)  # upsampled (nearest x2), then a 3x3
        walk.block += 1

    walk.norm(groups)
    walk.conv(channels[0], 0)
    walk.block += 1
    walk.output(config.get("out_channels", 4))
    return walk.traffic(walk.block)
