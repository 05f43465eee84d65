"""Vision transformers (DeiT, Touvron et al. 2021) that GPD can widen: DeiT-Ti / DeiT-S and a tiny one.

The layout and names are timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``,
``head``), so timm's DeiT weight files load unchanged (``load_teacher_weights``) and give timm's
logits (tested against timm's own class). Class-token pooling, pre-norm blocks, LayerNorm eps
1e-6, GELU MLP of ratio 4, no dropout or stochastic depth.

GPD (core.gpd.widen) widens every channel ``ratio`` times: the patch embedding is the stem, the
classifier the head; the fused ``qkv`` projection widens block by block (``gpd_out_blocks = 3``);
attention heads keep their size, so the dynamic teacher has ``ratio`` times the heads; LayerNorm
and GELU have width-sliced versions; the class token and position embedding are channel
parameters (``gpd_channel_parameters``). The forward reads the current width from the channel
count of the patch embedding: at teacher width (activations at ``1 / ratio`` of the student's)
the attention logits are multiplied back by ``ratio**2``; on a plain model every such factor is 1.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepkd_det.core.gpd import channel_parameter

__all__ = ["VisionTransformer", "deit_small", "deit_tiny", "vit_tiny_test"]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qkv.gpd_out_blocks = 3  # q, k, v widen separately (core.gpd.SlicedLinear)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        heads = c // self.head_dim  # num_heads on the plain model, ratio times more when widened
        q, k, v = self.qkv(x).reshape(b, n, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        ratio = c // self.dim
        if ratio != 1:  # q and k at 1 / ratio of the student's scale: the logits are the student's again
            q, k = q * ratio, k * ratio
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, tokens, dim)


class VisionTransformer(nn.Module):
    """DeiT-style ViT for ``img_size`` square images (``forward_stages``: ReviewKD's levels)."""

    gpd_channel_parameters = ("cls_token", "pos_embed")

    def __init__(self, num_classes: int = 1000, img_size: int = 224, patch_size: int = 16, dim: int = 192,
                 depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.grid, self.img_size = img_size // patch_size, img_size
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2 + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self.feature_dim = dim
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if x.shape[1] != self.grid**2:
            raise ValueError(f"{x.shape[1]} patches, expected {self.grid ** 2}: the input must be "
                             f"{self.grid * self.patch_embed.proj.stride[0]} px square")
        c = x.shape[-1]
        cls = channel_parameter(self.cls_token, c).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + channel_parameter(self.pos_embed, c)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self._tokens(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The patch tokens after the last norm as an (N, dim, grid, grid) map."""
        tokens = self.forward_tokens(x)[:, 1:]
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)

    def forward_stages(self, x: torch.Tensor, preact: bool = True) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """ReviewKD's levels as the GPD release reads a transformer: the patch tokens after each of
        four evenly spaced blocks, as (N, dim, grid, grid) maps, then the class feature as (N, dim, 1, 1);
        ``preact`` is meaningless here (no ReLU) and ignored."""
        depth = len(self.blocks)
        taps = {depth * (i + 1) // 4 - 1 for i in range(4)}
        x_tokens = self._tokens(x)
        feats = []
        for i, block in enumerate(self.blocks):
            x_tokens = block(x_tokens)
            if i in taps:
                patches = x_tokens[:, 1:].transpose(1, 2)
                feats.append(patches.reshape(x.shape[0], -1, self.grid, self.grid))
        cls = self.norm(x_tokens)[:, 0]
        feats.append(cls[:, :, None, None])
        return feats, self.head(cls)


def deit_tiny(num_classes: int = 1000) -> VisionTransformer:
    """DeiT-Ti (timm ``deit_tiny_patch16_224``): dim 192, 12 blocks, 3 heads, 5.7 M parameters."""
    return VisionTransformer(num_classes, 224, 16, 192, 12, 3)


def deit_small(num_classes: int = 1000) -> VisionTransformer:
    """DeiT-S (timm ``deit_small_patch16_224``): dim 384, 12 blocks, 6 heads, 22.1 M parameters."""
    return VisionTransformer(num_classes, 224, 16, 384, 12, 6)


def vit_tiny_test(num_classes: int = 10) -> VisionTransformer:
    """A tiny ViT for tests and the digits demo: 16 px images, 4 px patches, dim 32, 2 blocks, 2 heads."""
    return VisionTransformer(num_classes, 16, 4, 32, 2, 2)
