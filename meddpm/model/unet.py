"""A 3D UNet in the guided-diffusion layout that Med-DDPM uses, parameter for parameter.

Module and parameter names equal those of Med-DDPM's checkpoints (`input_blocks.1.0.in_layers.2.weight`,
...), so a released state dict loads without renaming. `ConditionalDenoiser` adds the one thing the
checkpoints leave to the caller: concatenating the noisy image with the condition channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from meddpm.model.presets import Preset, UNetConfig

TIME_EMBEDDING_MAX_PERIOD = 1000.0


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding, cosines first then sines; timesteps may be fractional."""
    half = dim // 2
    exponent = -math.log(TIME_EMBEDDING_MAX_PERIOD) * torch.arange(half, dtype=torch.float32) / half
    angles = timesteps.float()[:, None] * torch.exp(exponent).to(timesteps.device)[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class ResBlock(nn.Module):
    """Two 3x3x3 convolutions with the time embedding added in between (no scale-shift norm)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Conv3d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            _zeroed(nn.Conv3d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv3d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb).type(x.dtype)[:, :, None, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all voxels, legacy guided-diffusion QKV layout."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        tokens = x.reshape(b, c, -1)
        # (B, 3C, N) -> q, k, v as (B, heads=1, N, C)
        q, k, v = (part.transpose(1, 2)[:, None] for part in self.qkv(self.norm(tokens)).split(c, dim=1))
        # softmax(q k^T / sqrt(c)) v: the reference scales q and k by c^-1/4 each, the same product.
        attended = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(c))
        h = self.proj_out(attended[:, 0].transpose(1, 2))
        return (tokens + h).reshape(b, c, *spatial)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="trilinear"))


class TimestepSequential(nn.Sequential):
    """A block list whose residual blocks also receive the time embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class MedDDPMUNet(nn.Module):
    """eps = unet(cat[x_t, condition], t) on (B, C, D, H, W) volumes."""

    def __init__(self, config: UNetConfig, in_channels: int, out_channels: int):
        super().__init__()
        base, groups = config.model_channels, config.norm_groups
        emb_channels = 4 * base
        self.model_channels = base
        self.time_embed = nn.Sequential(nn.Linear(base, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))

        ch = base * config.channel_mult[0]
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv3d(in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        factor = 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_channels, base * mult, groups)]
                ch = base * mult
                if factor in config.attention_factors:
                    layers.append(AttentionBlock(ch, groups))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level < len(config.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skip_channels.append(ch)
                factor *= 2

        self.middle_block = TimestepSequential(
            ResBlock(ch, emb_channels, ch, groups), AttentionBlock(ch, groups), ResBlock(ch, emb_channels, ch, groups)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_channels, base * mult, groups)]
                ch = base * mult
                if factor in config.attention_factors:
                    layers.append(AttentionBlock(ch, groups))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                    factor //= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), _zeroed(nn.Conv3d(ch, out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


class ConditionalDenoiser(nn.Module):
    """The exported graph: noisy image, condition and timestep in; predicted noise out (meddpm.model.tensors)."""

    def __init__(self, unet: MedDDPMUNet):
        super().__init__()
        self.unet = unet

    def forward(self, noisy_image: torch.Tensor, condition: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([noisy_image, condition], dim=1), timestep)


def build_unet(preset: Preset) -> MedDDPMUNet:
    return MedDDPMUNet(preset.unet, preset.in_channels, preset.out_channels)


def _zeroed(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module
