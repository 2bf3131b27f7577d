"""ADM, the UNet of guided-diffusion (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image
Synthesis"), reimplemented so that OpenAI's checkpoints load key for key.

The module names and their order follow `guided_diffusion/unet.py` exactly (`time_embed`,
`input_blocks`, `middle_block`, `output_blocks`, `out`), because the state-dict keys are derived
from them.

Differences from the original that do not change results:
- attention has two implementations of the same maths (`AttentionBlock.impl`): "sdpa", PyTorch's
  fused `F.scaled_dot_product_attention` (the default; flash/memory-efficient kernels on CUDA),
  and "legacy", guided-diffusion's own formulation (q and k each scaled by ch^-1/4, explicit
  (T, T) weights, softmax in float32). On CPU in float32 the two agree to the last bit in our
  tests; `ADMBackbone` uses "legacy" for its exact float32 path and "sdpa" for its fast path;
- `use_fp16` is accepted but ignored: weights stay float32 and `ADMBackbone` chooses the precision
  (bf16 autocast on CUDA, exact float32 on CPU);
- `use_checkpoint` uses `torch.utils.checkpoint`, for attention blocks too only when asked
  (guided-diffusion always checkpoints attention, which only trades memory for time).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparseseg.backbones.adm_flags import NORM_GROUPS, ADMFlags
from sparseseg.errors import SparsesegError

# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (stable under fp16/bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(NORM_GROUPS, channels)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialises a module: residual branches start as the identity (as in guided-diffusion)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embeddings of (possibly fractional) timesteps, cosines first.

    Args:
        timesteps: (N,) timesteps.
        dim: embedding width.
        max_period: sets the lowest frequency.

    Returns:
        (N, dim) float32 embeddings.
    """
    half = dim // 2
    # Computed in the same order as guided-diffusion so that float32 rounding matches.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs.to(timesteps.device)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepBlock(nn.Module):
    """A module whose forward also takes the (N, emb) timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """nn.Sequential that hands the timestep embedding to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution, or by average pooling."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling by 2.

    With `use_scale_shift_norm` the embedding gives a scale and shift applied after the second
    GroupNorm (FiLM); otherwise it is added before it. With `up`/`down` both the branch and the
    skip path are resampled between the first norm+SiLU and the first convolution.

    Args:
        channels: input channels.
        emb_channels: timestep-embedding width.
        dropout: dropout rate before the second convolution.
        out_channels: output channels (default: `channels`); a 1x1 conv adapts the skip path.
        use_scale_shift_norm: FiLM conditioning.
        use_checkpoint: gradient checkpointing while training.
        up: upsample 2x (nearest).
        down: downsample 2x (average pooling).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            _norm(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W), (N, emb) -> (N, C_out, H', W')."""
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # Resample after norm+SiLU but before the conv, on both paths.
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a residual connection.

    Args:
        channels: input and output channels.
        num_heads: heads, used when `num_head_channels` is -1.
        num_head_channels: fixed width per head (then heads = channels // num_head_channels).
        use_checkpoint: gradient checkpointing while training.
        use_new_attention_order: split the qkv projection into q, k, v before splitting heads
            (`QKVAttention`); the legacy order (`QKVAttentionLegacy`, used by OpenAI's released
            checkpoints) splits heads first, so each head's q, k, v are contiguous.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.new_order = use_new_attention_order
        self.impl = "sdpa"  # or "legacy"; see ATTENTION_IMPLS and ADMUNet.set_attention
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T)
        heads, ch, length = self.num_heads, c // self.num_heads, x.shape[-1]
        if self.new_order:
            q, k, v = (t.reshape(b * heads, ch, length) for t in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
        if self.impl == "legacy":
            a = legacy_attention(q, k, v)
        else:
            # SDPA scales by 1/sqrt(ch), the same as guided-diffusion's ch^-1/4 on both q and k.
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            a = a.transpose(1, 2)
        h = self.proj_out(a.reshape(b, c, length))
        return (x + h).reshape(b, c, *spatial)


#: Attention implementations of `AttentionBlock` (same maths; see the module docstring).
ATTENTION_IMPLS = ("sdpa", "legacy")


def legacy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention as guided-diffusion computes it, for (N, ch, T) queries, keys and values.

    q and k are each scaled by ch^-1/4 before their product (for float16 headroom), the (N, T, T)
    weights are materialised and normalised by a softmax in float32, then cast back.

    Returns:
        (N, ch, T).
    """
    scale = 1.0 / math.sqrt(math.sqrt(q.shape[1]))
    weights = torch.einsum("nct,ncs->nts", q * scale, k * scale)
    weights = torch.softmax(weights.float(), dim=-1).to(weights.dtype)
    return torch.einsum("nts,ncs->nct", weights, v)


# --------------------------------------------------------------------------------------------------
# The UNet
# --------------------------------------------------------------------------------------------------


class ADMUNet(nn.Module):
    """guided-diffusion's `UNetModel` (2-D, RGB in), built from `ADMFlags`.

    Fully convolutional: any input whose side is a multiple of `size_divisor` works, whatever
    `image_size` (which, as in guided-diffusion, only selects the default channel_mult and turns
    attention_resolutions into downsampling rates).

    Attributes:
        flags: the flags it was built from.
        size_divisor: 2 ** (levels - 1); input sides must be multiples of it.
        output_block_channels: channels of each `output_blocks[i]` output.
        output_block_reductions: input side / output side of each `output_blocks[i]` output.
    """

    def __init__(self, flags: ADMFlags) -> None:
        super().__init__()
        self.flags = flags
        mc = flags.num_channels
        mults = flags.channel_mults()
        attention_ds = set(flags.attention_downsample_rates())
        heads_up = flags.num_heads if flags.num_heads_upsample == -1 else flags.num_heads_upsample
        emb_dim = mc * 4
        self.model_channels = mc
        self.size_divisor = 2 ** (len(mults) - 1)
        self.num_classes = 1000 if flags.class_cond else None

        def res(ch: int, out: int | None = None, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch, emb_dim, flags.dropout, out, flags.use_scale_shift_norm, flags.use_checkpoint, up, down
            )

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch, heads, flags.num_head_channels, flags.use_checkpoint, flags.use_new_attention_order
            )

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if self.num_classes is not None:
            self.label_emb = nn.Embedding(self.num_classes, emb_dim)

        # 1. Encoder: per level, num_res_blocks ResBlocks (+ attention), then a downsample.
        ch = input_ch = int(mults[0] * mc)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(3, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(mults):
            for _ in range(flags.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in attention_ds:
                    layers.append(attn(ch, flags.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(mults) - 1:
                down = res(ch, ch, down=True) if flags.resblock_updown else Downsample(ch, use_conv=True)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        # 2. Bottleneck.
        self.middle_block = TimestepEmbedSequential(res(ch), attn(ch, flags.num_heads), res(ch))

        # 3. Decoder: per level (deepest first), num_res_blocks + 1 ResBlocks fed with the skips.
        self.output_blocks = nn.ModuleList()
        channels, reductions = [], []
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(flags.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in attention_ds:
                    layers.append(attn(ch, heads_up))
                if level and i == flags.num_res_blocks:
                    layers.append(
                        res(ch, ch, up=True) if flags.resblock_updown else Upsample(ch, use_conv=True)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                channels.append(ch)
                reductions.append(ds)
        self.output_block_channels = tuple(channels)
        self.output_block_reductions = tuple(reductions)

        self.out = nn.Sequential(
            _norm(ch), nn.SiLU(), _zero(nn.Conv2d(input_ch, 6 if flags.learn_sigma else 3, 3, padding=1))
        )

    def _embed(self, timesteps: torch.Tensor | int, batch: int, y: torch.Tensor | None) -> torch.Tensor:
        if (y is None) != (self.num_classes is None):
            raise SparsesegError("class labels y must be given if and only if the model is class_cond")
        t = torch.as_tensor(timesteps, device=self.time_embed[0].weight.device)
        t = t.expand(batch) if t.ndim == 0 else t
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        if y is not None:
            emb = emb + self.label_emb(y)
        return emb

    def _encode(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Runs the encoder and the bottleneck; returns the bottleneck output and the skips."""
        skips = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        return self.middle_block(h, emb), skips

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor | int, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicts the noise (and the variance interpolation values with learn_sigma).

        Args:
            x: (N, 3, H, W) noisy images x_t; H and W multiples of `size_divisor`.
            timesteps: (N,) raw integer timesteps (or one int for the batch), not rescaled.
            y: (N,) class labels, only for class_cond models.

        Returns:
            (N, 6 or 3, H, W): epsilon in channels 0-2, then the learned variance values.
        """
        emb = self._embed(timesteps, x.shape[0], y)
        h, skips = self._encode(x, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

    def forward_blocks(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | int,
        blocks: Sequence[int],
        y: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """Decoder activations, stopping after the deepest requested block.

        Args:
            x: (N, 3, H, W) noisy images x_t.
            timesteps: (N,) raw integer timesteps (or one int for the batch).
            blocks: indices into `output_blocks`.
            y: (N,) class labels, only for class_cond models.

        Returns:
            block -> (N, output_block_channels[block], H / r, W / r) with
            r = output_block_reductions[block]: the output of `output_blocks[block]`, after its
            upsampling layer where it has one. Later blocks and `out` are not run.
        """
        self.check_blocks(blocks)
        wanted = set(blocks)
        last = max(wanted)
        emb = self._embed(timesteps, x.shape[0], y)
        h, skips = self._encode(x, emb)
        found = {}
        for i, module in enumerate(self.output_blocks[: last + 1]):
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
            if i in wanted:
                found[i] = h
        return {b: found[b] for b in blocks}

    def set_attention(self, impl: str) -> None:
        """Selects the attention implementation of every `AttentionBlock` ("sdpa" or "legacy")."""
        if impl not in ATTENTION_IMPLS:
            raise SparsesegError(f"attention {impl!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
        for module in self.modules():
            if isinstance(module, AttentionBlock):
                module.impl = impl

    def check_blocks(self, blocks: Sequence[int]) -> None:
        """Raises SparsesegError unless `blocks` is a non-empty list of valid decoder indices."""
        n = len(self.output_blocks)
        bad = [b for b in blocks if not 0 <= b < n]
        if not blocks or bad:
            raise SparsesegError(
                f"blocks {list(blocks)}: expected output_blocks indices in 0..{n - 1} "
                f"(this architecture has {n} decoder blocks)"
            )
