"""GPD (Gap Preserving Distillation, Guo et al., ICLR 2025): a dynamic teacher that shares the student's weights.

The dynamic teacher is the student widened ``ratio`` times. Every conv / linear / BN of the
student is the leading slice of the matching layer of the dynamic teacher (hard parameter
sharing), so one set of parameters runs at two widths: ``STUDENT`` and ``DYNAMIC_TEACHER``.
``widen`` swaps the layers of a plain model for width-sliced ones, ``set_width`` / ``at_width``
pick the width, ``export`` returns the plain student again (its state dict loads into the
ordinary student class). See docs/gpd.md for the method and where every number comes from.

Scale convention (the released code's): at teacher width every hidden activation is the
student's activation replicated ``ratio`` times and divided by ``ratio``.

- Dense layers (conv with ``groups == 1``, linear) hold ``W / ratio_out`` tiled over the
  channel blocks; the student uses the leading block times ``ratio_out``. Summing ``ratio``
  replicas of ``x / ratio`` through ``W / ratio`` gives ``W x / ratio``: the scale is kept.
- Per-channel layers (grouped / depthwise conv, BN, clamps) hold plain tiled values and run at
  the student's scale at teacher width: ``f(ratio * x) / ratio``.
- The stem keeps the image channels and the head keeps the class count, so the logits of the
  two widths agree: that is Inverse Reparameterization (IR). IR is exact (up to rounding) with
  ``noise_std=0``; the default adds N(0, 1e-6) noise (as released) to the replicas but never
  to the leading slice, so the student is not changed by widening.

Channel-Branch Reparameterization (CBR): eligible convs (by default the released rule,
3x3 / stride 1 / padding 1) get six training-time branches combined in weight space (OREPA
style); ``BranchConv2d.fold`` gives the single equivalent kernel, which is what the forward uses
and what ``export`` writes. Each branch parameter is width-sliced like the conv it belongs to.

The widened model keeps the original module tree and names, so checkpoints, EMA and DDP see an
ordinary module. Functional ops are not inspected: a model that concatenates or shuffles
channels (ShuffleNet) breaks the leading-slice layout; pass ``example_input`` to ``widen`` to
have the two widths compared, and it raises if they disagree.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .rng import preserve_rng_state

__all__ = [
    "BranchConv2d",
    "CBR_BRANCHES",
    "CBR_DW_EXPANSION",
    "CBR_INITS",
    "CBR_SCALE_INIT",
    "DYNAMIC_TEACHER",
    "GPD_DT_KD_WEIGHT",
    "GPD_IR_NOISE_STD",
    "GPD_RATIO",
    "GPD_SOFT_TARGET_SMOOTHING",
    "STUDENT",
    "SlicedBatchNorm2d",
    "SlicedConv2d",
    "SlicedGELU",
    "SlicedHardtanh",
    "SlicedLayerNorm",
    "SlicedLinear",
    "channel_parameter",
    "WIDTHS",
    "WidthSliced",
    "at_width",
    "cbr_eligible",
    "export",
    "fold_branches",
    "gpd_ratio",
    "gpd_soft_target_loss",
    "ir_gap",
    "set_width",
    "widen",
]

STUDENT = "student"
DYNAMIC_TEACHER = "dynamic_teacher"
WIDTHS = (STUDENT, DYNAMIC_TEACHER)

# The authors' released values (sources in docs/gpd.md §2 and §5): ratio 2, dynamic-teacher ->
# student weight 3, IR noise N(0, 1e-6), soft-target smoothing 0.1.
GPD_RATIO = 2
GPD_DT_KD_WEIGHT = 3.0
GPD_IR_NOISE_STD = 1e-6
GPD_SOFT_TARGET_SMOOTHING = 0.1

# CBR branches, in the released order, with their initial per-channel scales (docs/gpd.md §3).
# "kxk" is a second full kernel (the released "1x1" branch allocates a k x k weight); the depthwise
# branch makes CBR_DW_EXPANSION channels per input channel.
CBR_BRANCHES = ("origin", "avg", "prior", "1x1_kxk", "kxk", "dw_pw")
CBR_SCALE_INIT = (0.25, 0.25, 0.0, 0.5, 0.05, 0.5)
CBR_DW_EXPANSION = 8
# "multi": the released from-scratch init (random extra branches, scales above); "single": only the
# original kernel is active (scale 1, others 0), so a pretrained student keeps its function.
CBR_INITS = ("multi", "single")

# Activations that are not positively homogeneous: f(x / r) != f(x) / r, so IR cannot hold.
_NON_HOMOGENEOUS = (
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.Mish,
)


@dataclass(frozen=True)
class _Role:
    """How one tensor of a sliced layer depends on width.

    ``grows``: (dim, side) pairs, side ``"in"`` or ``"out"``: that dim is ``ratio_<side>`` times
    longer at teacher width and the student uses its leading part. ``divide``: the side whose
    ratio IR divides the replicas by (dense maps); the student's slice is multiplied back by it.
    """

    grows: Tuple[Tuple[int, str], ...]
    divide: Optional[str] = None


_PER_OUT_CHANNEL = _Role(((0, "out"),))
_DENSE_WEIGHT = _Role(((0, "out"), (1, "in")), divide="out")
_DENSE_BIAS = _Role(((0, "out"),), divide="out")


class WidthSliced(nn.Module):
    """A layer holding dynamic-teacher-sized tensors whose leading slices are the student's layer."""

    def __init__(self, ratio_in: int, ratio_out: int):
        super().__init__()
        self.ratio_in = ratio_in
        self.ratio_out = ratio_out
        self.width = STUDENT
        self._roles: Dict[str, _Role] = {}

    def _ratio(self, side: str) -> int:
        return self.ratio_in if side == "in" else self.ratio_out

    def _leading(self, shape: torch.Size, role: _Role) -> Tuple[slice, ...]:
        index = [slice(None)] * len(shape)
        for dim, side in role.grows:
            index[dim] = slice(0, shape[dim] // self._ratio(side))
        return tuple(index)

    def student_tensor(self, name: str) -> Optional[torch.Tensor]:
        """The student's view of tensor ``name`` (a differentiable slice of the shared tensor)."""
        tensor = getattr(self, name)
        if tensor is None:
            return None
        role = self._roles[name]
        view = tensor[self._leading(tensor.shape, role)]
        if role.divide is not None and self._ratio(role.divide) != 1:
            view = view * self._ratio(role.divide)
        return view

    def tensor_at(self, name: str, width: str) -> Optional[torch.Tensor]:
        return self.student_tensor(name) if width == STUDENT else getattr(self, name)

    def _register(self, name: str, value: Optional[torch.Tensor], role: _Role, *, parameter: bool) -> None:
        """Register the teacher-sized tensor for a student-sized ``value`` (filled by ``_inverse_reparameterize``)."""
        self._roles[name] = role
        if value is None:
            if parameter:
                self.register_parameter(name, None)
            else:
                self.register_buffer(name, None)
            return
        shape = list(value.shape)
        for dim, side in role.grows:
            shape[dim] *= self._ratio(side)
        empty = torch.empty(shape, dtype=value.dtype, device=value.device)
        if parameter:
            trainable = value.requires_grad or not isinstance(value, nn.Parameter)
            self.register_parameter(name, nn.Parameter(empty, requires_grad=trainable))
        else:
            self.register_buffer(name, empty)

    @torch.no_grad()
    def _inverse_reparameterize(
        self, name: str, value: Optional[torch.Tensor], noise_std: float, generator: Optional[torch.Generator]
    ) -> None:
        """Fill tensor ``name`` from the student's ``value``: tile, divide dense maps, noise off the leading slice."""
        target = getattr(self, name)
        if target is None:
            return
        role = self._roles[name]
        reps = [1] * value.dim()
        for dim, side in role.grows:
            reps[dim] = self._ratio(side)
        full = value.detach().to(target.dtype).repeat(*reps)
        if role.divide is not None and self._ratio(role.divide) != 1:
            full = full / self._ratio(role.divide)
        if noise_std > 0 and isinstance(target, nn.Parameter):
            noise = torch.randn(full.shape, generator=generator, dtype=full.dtype).to(full.device) * noise_std
            noise[self._leading(full.shape, role)] = 0  # the student keeps its exact weights
            full = full + noise
        target.copy_(full)

    def to_plain(self) -> nn.Module:
        """The ordinary student-width module with this layer's current student weights."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"ratio_in={self.ratio_in}, ratio_out={self.ratio_out}, width={self.width}"


def _conv_geometry(conv: nn.Conv2d) -> Dict[str, object]:
    if conv.padding_mode != "zeros":
        raise ValueError(f"width slicing supports padding_mode='zeros' only, got {conv.padding_mode!r}")
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)


def _check_grouped(conv: nn.Conv2d, ratio_in: int, ratio_out: int) -> None:
    if conv.groups > 1 and ratio_in != ratio_out:
        raise ValueError(
            f"a grouped conv ({conv.in_channels}->{conv.out_channels}, groups={conv.groups}) must widen "
            f"its input and output alike (ratio_in={ratio_in}, ratio_out={ratio_out}); it cannot be the stem or head"
        )


class SlicedConv2d(WidthSliced):
    """Conv2d at two widths. Dense: student = ``ratio_out * W[:co, :ci]``; grouped: ``groups / ratio`` groups."""

    def __init__(
        self,
        conv: nn.Conv2d,
        ratio_in: int,
        ratio_out: int,
        noise_std: float = GPD_IR_NOISE_STD,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__(ratio_in, ratio_out)
        _check_grouped(conv, ratio_in, ratio_out)
        self.geometry = _conv_geometry(conv)
        self.kernel_size = conv.kernel_size
        self.student_in_channels, self.student_out_channels = conv.in_channels, conv.out_channels
        self.student_groups = conv.groups
        self.groups = conv.groups * ratio_out if conv.groups > 1 else 1
        grouped = conv.groups > 1
        self._register("weight", conv.weight, _PER_OUT_CHANNEL if grouped else _DENSE_WEIGHT, parameter=True)
        self._register("bias", conv.bias, _PER_OUT_CHANNEL if grouped else _DENSE_BIAS, parameter=True)
        for name in ("weight", "bias"):
            self._inverse_reparameterize(name, getattr(conv, name), noise_std, generator)

    def kernel_at(self, width: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.tensor_at("weight", width), self.tensor_at("bias", width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.kernel_at(self.width)
        if self.width == STUDENT:
            return F.conv2d(x, weight, bias, groups=self.student_groups, **self.geometry)
        if self.groups > 1 and bias is not None:
            bias = bias / self.ratio_out  # per-channel map run at the student's scale: f(r x) / r
        return F.conv2d(x, weight, bias, groups=self.groups, **self.geometry)

    @torch.no_grad()
    def to_plain(self) -> nn.Conv2d:
        weight, bias = self.kernel_at(STUDENT)
        return _plain_conv(self, weight, bias)


def _plain_conv(
    layer: SlicedConv2d | BranchConv2d, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> nn.Conv2d:
    conv = nn.Conv2d(
        layer.student_in_channels,
        layer.student_out_channels,
        layer.kernel_size,
        groups=layer.student_groups,
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
        **layer.geometry,
    )
    conv.weight.copy_(weight)
    if bias is not None:
        conv.bias.copy_(bias)
    return conv.train(layer.training)


class SlicedLinear(WidthSliced):
    """Linear at two widths: student = ``ratio_out * W[:out, :in]``, ``ratio_out * b[:out]``.

    ``out_blocks`` > 1: the output is ``out_blocks`` stacked maps of ``out / out_blocks`` features
    each (a transformer's fused q / k / v projection); each block widens on its own, so at teacher
    width the output is ``[q (r c), k (r c), v (r c)]`` and the student reads the leading part of
    every block. A plain ``nn.Linear`` asks for it with an attribute ``gpd_out_blocks``.
    """

    def __init__(
        self,
        linear: nn.Linear,
        ratio_in: int,
        ratio_out: int,
        noise_std: float = GPD_IR_NOISE_STD,
        generator: Optional[torch.Generator] = None,
        out_blocks: int = 1,
    ):
        super().__init__(ratio_in, ratio_out)
        if out_blocks < 1 or linear.out_features % out_blocks:
            raise ValueError(f"out_blocks {out_blocks} does not divide out_features {linear.out_features}")
        self.out_blocks = int(out_blocks)
        self.student_in_features, self.student_out_features = linear.in_features, linear.out_features
        self._register("weight", linear.weight, _DENSE_WEIGHT, parameter=True)
        self._register("bias", linear.bias, _DENSE_BIAS, parameter=True)
        for name in ("weight", "bias"):
            value = getattr(linear, name)
            if value is not None and self.out_blocks > 1:  # fill block by block, then interleave
                self._inverse_reparameterize_blocks(name, value, noise_std, generator)
            else:
                self._inverse_reparameterize(name, value, noise_std, generator)

    def _split(self, tensor: torch.Tensor) -> torch.Tensor:
        """(blocks * n, ...) -> (blocks, n, ...)."""
        return tensor.reshape(self.out_blocks, tensor.shape[0] // self.out_blocks, *tensor.shape[1:])

    @torch.no_grad()
    def _inverse_reparameterize_blocks(self, name, value, noise_std, generator) -> None:
        target = getattr(self, name)
        blocks = self._split(value.detach().to(target.dtype))
        reps = [1, self.ratio_out] + ([self.ratio_in] if value.dim() == 2 else [])
        full = blocks.repeat(*reps) / self.ratio_out
        if noise_std > 0:
            noise = torch.randn(full.shape, generator=generator, dtype=full.dtype).to(full.device) * noise_std
            lead = [slice(None), slice(0, blocks.shape[1])] + ([slice(0, value.shape[1])] if value.dim() == 2 else [])
            noise[tuple(lead)] = 0
            full = full + noise
        target.copy_(full.reshape(target.shape))

    def student_tensor(self, name: str) -> Optional[torch.Tensor]:
        tensor = getattr(self, name)
        if tensor is None or self.out_blocks == 1:
            return super().student_tensor(name)
        blocks = self._split(tensor)
        n = blocks.shape[1] // self.ratio_out
        view = blocks[:, :n, : self.student_in_features] if tensor.dim() == 2 else blocks[:, :n]
        return view.reshape(self.out_blocks * n, *view.shape[2:]) * self.ratio_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.tensor_at("weight", self.width), self.tensor_at("bias", self.width))

    @torch.no_grad()
    def to_plain(self) -> nn.Linear:
        weight, bias = self.student_tensor("weight"), self.student_tensor("bias")
        linear = nn.Linear(
            self.student_in_features,
            self.student_out_features,
            bias=bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear.train(self.training)


class SlicedBatchNorm2d(WidthSliced):
    """BatchNorm2d with shared affine slices and separate running statistics per width.

    As released (docs/gpd.md §1), the student's statistics are kept apart: the two widths see
    different batch statistics, so one running average would fit neither.
    """

    def __init__(self, bn: nn.BatchNorm2d, ratio: int, noise_std: float = GPD_IR_NOISE_STD, generator=None):
        super().__init__(ratio, ratio)
        self.num_features = bn.num_features
        self.eps, self.momentum = bn.eps, bn.momentum
        self.affine, self.track_running_stats = bn.affine, bn.track_running_stats
        self._register("weight", bn.weight, _PER_OUT_CHANNEL, parameter=True)
        self._register("bias", bn.bias, _PER_OUT_CHANNEL, parameter=True)
        self._register("running_mean", bn.running_mean, _PER_OUT_CHANNEL, parameter=False)
        self._register("running_var", bn.running_var, _PER_OUT_CHANNEL, parameter=False)
        for name in ("weight", "bias", "running_mean", "running_var"):
            self._inverse_reparameterize(name, getattr(bn, name), noise_std, generator)
        tracked = bn.num_batches_tracked
        for prefix in ("", "student_"):
            if bn.track_running_stats:
                self.register_buffer(prefix + "num_batches_tracked", tracked.detach().clone())
            else:
                self.register_buffer(prefix + "num_batches_tracked", None)
        for name in ("running_mean", "running_var"):
            stat = getattr(bn, name)
            self.register_buffer("student_" + name, None if stat is None else stat.detach().clone())

    def _statistics(self, width: str):
        prefix = "student_" if width == STUDENT else ""
        return (
            getattr(self, prefix + "running_mean"),
            getattr(self, prefix + "running_var"),
            getattr(self, prefix + "num_batches_tracked"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var, tracked = self._statistics(self.width)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and tracked is not None:
            tracked.add_(1)
            factor = 1.0 / float(tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (mean is None and var is None)
        if self.training and not self.track_running_stats:
            mean = var = None
        weight, bias = self.tensor_at("weight", self.width), self.tensor_at("bias", self.width)
        if self.width == STUDENT:
            return F.batch_norm(x, mean, var, weight, bias, use_batch_stats, factor, self.eps)
        r = self.ratio_out  # per-channel map run at the student's scale: f(r x) / r
        return F.batch_norm(x * r, mean, var, weight, bias, use_batch_stats, factor, self.eps) / r

    @torch.no_grad()
    def to_plain(self) -> nn.BatchNorm2d:
        mean, var, tracked = self._statistics(STUDENT)
        reference = mean if mean is not None else self.weight
        bn = nn.BatchNorm2d(
            self.num_features,
            eps=self.eps,
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=self.track_running_stats,
            device=None if reference is None else reference.device,
            dtype=None if reference is None else reference.dtype,
        )
        if self.affine:
            bn.weight.copy_(self.student_tensor("weight"))
            bn.bias.copy_(self.student_tensor("bias"))
        if self.track_running_stats:
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(tracked)
        return bn.train(self.training)


class SlicedLayerNorm(WidthSliced):
    """LayerNorm over the channel (last) dim at two widths.

    At teacher width the input is the student's replicated and divided by ``r``: its mean and
    variance are the student's divided by ``r`` and ``r**2``, so normalising with ``eps / r**2``
    gives the student's normalised values exactly; the affine tensors hold ``w / r``, ``b / r``
    tiled (dense-like), which puts the output back at the teacher's ``1 / r`` scale.
    """

    def __init__(self, norm: nn.LayerNorm, ratio: int, noise_std: float = GPD_IR_NOISE_STD, generator=None):
        super().__init__(ratio, ratio)
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"LayerNorm over {tuple(norm.normalized_shape)}: only a 1-D (channel) shape widens")
        self.num_features, self.eps = norm.normalized_shape[0], norm.eps
        self._register("weight", norm.weight, _DENSE_BIAS, parameter=True)
        self._register("bias", norm.bias, _DENSE_BIAS, parameter=True)
        for name in ("weight", "bias"):
            self._inverse_reparameterize(name, getattr(norm, name), noise_std, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.tensor_at("weight", self.width), self.tensor_at("bias", self.width)
        if self.width == STUDENT:
            return F.layer_norm(x, (self.num_features,), weight, bias, self.eps)
        r = self.ratio_out
        return F.layer_norm(x, (self.num_features * r,), weight, bias, self.eps / r**2)

    @torch.no_grad()
    def to_plain(self) -> nn.LayerNorm:
        weight, bias = self.student_tensor("weight"), self.student_tensor("bias")
        reference = weight if weight is not None else bias
        norm = nn.LayerNorm(self.num_features, eps=self.eps, elementwise_affine=weight is not None,
                            bias=bias is not None, device=None if reference is None else reference.device,
                            dtype=None if reference is None else reference.dtype)
        if weight is not None:
            norm.weight.copy_(weight)
        if bias is not None:
            norm.bias.copy_(bias)
        return norm.train(self.training)


class SlicedGELU(WidthSliced):
    """GELU at two widths: at teacher width it runs at the student's scale, ``f(r x) / r`` (the
    release's rule for its non-linear layers), so IR stays exact although GELU is not homogeneous."""

    def __init__(self, act: nn.GELU, ratio: int):
        super().__init__(ratio, ratio)
        self.approximate = act.approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width == STUDENT:
            return F.gelu(x, approximate=self.approximate)
        r = self.ratio_out
        return F.gelu(x * r, approximate=self.approximate) / r

    def to_plain(self) -> nn.GELU:
        return nn.GELU(approximate=self.approximate)


class SlicedHardtanh(WidthSliced):
    """Hardtanh / ReLU6 at two widths: at teacher width the bounds shrink by ``ratio`` (= f(r x) / r)."""

    def __init__(self, act: nn.Hardtanh, ratio: int):
        super().__init__(ratio, ratio)
        self.plain_type = type(act)
        self.min_val, self.max_val, self.inplace = act.min_val, act.max_val, act.inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1 if self.width == STUDENT else self.ratio_out
        return F.hardtanh(x, self.min_val / scale, self.max_val / scale, self.inplace)

    def to_plain(self) -> nn.Hardtanh:
        if self.plain_type is nn.ReLU6:
            return nn.ReLU6(inplace=self.inplace)
        return nn.Hardtanh(self.min_val, self.max_val, inplace=self.inplace)


# --------------------------------------------------------------------------------------------
# Channel-Branch Reparameterization


def cbr_eligible(conv: nn.Conv2d) -> bool:
    """The released selection rule (docs/gpd.md §3): 3x3, stride 1, padding 1 (depthwise convs too)."""
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
    )


def _kaiming_uniform(shape: Sequence[int], fan_in: int, like: torch.Tensor, generator) -> torch.Tensor:
    bound = math.sqrt(6.0 / fan_in)  # kaiming_uniform_(a=0): gain sqrt(2) * sqrt(3 / fan_in)
    out = torch.empty(shape, dtype=like.dtype).uniform_(-bound, bound, generator=generator)
    return out.to(like.device)


def _frequency_prior(out_channels: int, kernel: int, like: torch.Tensor) -> torch.Tensor:
    """Fixed cosine filters of the "prior" branch: the first half vary along rows, the rest along columns."""
    half = out_channels / 2
    index = torch.arange(kernel, dtype=torch.float64) + 0.5
    prior = torch.empty(out_channels, kernel, kernel, dtype=torch.float64)
    for o in range(out_channels):
        if o < half:
            prior[o] = torch.cos(math.pi * index * (o + 1) / kernel)[:, None].expand(kernel, kernel)
        else:
            prior[o] = torch.cos(math.pi * index * (o + 1 - half) / kernel)[None, :].expand(kernel, kernel)
    return prior.to(dtype=like.dtype, device=like.device)


def _student_branches(conv: nn.Conv2d, init: str, generator) -> Dict[str, Optional[torch.Tensor]]:
    """Student-width CBR tensors for ``conv``: its kernel is the origin branch, the others start random."""
    w = conv.weight.detach()
    co, ig, kh, kw = w.shape
    ci = conv.in_channels
    identity = torch.zeros(ci, ig, dtype=w.dtype, device=w.device)
    identity[torch.arange(ci), torch.arange(ci) % ig] = 1
    if init == "single":
        scale = [1.0] + [0.0] * (len(CBR_BRANCHES) - 1)
    else:
        scale = list(CBR_SCALE_INIT)
    return {
        "weight_origin": w.clone(),
        "weight_avg": _kaiming_uniform((co, ig), ig, w, generator),
        "weight_prior_1x1": _kaiming_uniform((co, ig), ig, w, generator),
        "prior": _frequency_prior(co, kh, w),
        "weight_id_residual": torch.zeros(ci, ig, dtype=w.dtype, device=w.device),
        "identity": identity,
        "weight_kxk_after_1x1": _kaiming_uniform((co, ig, kh, kw), ig * kh * kw, w, generator),
        "weight_kxk": _kaiming_uniform((co, ig, kh, kw), ig * kh * kw, w, generator),
        "weight_dw": _kaiming_uniform((ci * CBR_DW_EXPANSION, kh, kw), kh * kw, w, generator),
        "weight_pw": _kaiming_uniform((co, ig * CBR_DW_EXPANSION), ig * CBR_DW_EXPANSION, w, generator),
        "branch_scale": torch.tensor(scale, dtype=w.dtype, device=w.device)[:, None].repeat(1, co),
        "bias": None if conv.bias is None else conv.bias.detach().clone(),
    }


def fold_branches(p: Dict[str, Optional[torch.Tensor]], groups: int) -> torch.Tensor:
    """The single kernel equal to the sum of the six CBR branches (weight-space, OREPA style).

    ``p`` holds one width's tensors: ``weight_origin`` / ``weight_kxk`` / ``weight_kxk_after_1x1``
    (co, ci/g, k, k), ``weight_avg`` / ``weight_prior_1x1`` (co, ci/g), ``prior`` (co, k, k),
    ``weight_id_residual`` / ``identity`` (ci, ci/g), ``weight_dw`` (ci*E, k, k), ``weight_pw``
    (co, ci/g*E), ``branch_scale`` (6, co). Branches, as ops on the input:
    origin conv; 1x1 conv then k x k average pool; 1x1 conv then fixed per-channel cosine filters;
    1x1 conv (identity + learned residual) then k x k conv; a second k x k conv; depthwise conv
    (E channels per input) then pointwise conv. Each branch output is scaled per channel.
    """
    origin = p["weight_origin"]
    co, ig, kh, kw = origin.shape
    g = groups
    avg = p["weight_avg"][:, :, None, None].expand(co, ig, kh, kw) / (kh * kw)
    prior = p["weight_prior_1x1"][:, :, None, None] * p["prior"][:, None, :, :]
    first = p["weight_id_residual"] + p["identity"]  # (t, ig): t internal channels, g groups
    t = first.shape[0]
    second = p["weight_kxk_after_1x1"]
    one_then_k = torch.einsum(
        "gti,gothw->goihw", first.reshape(g, t // g, ig), second.reshape(g, co // g, t // g, kh, kw)
    ).reshape(co, ig, kh, kw)
    e = CBR_DW_EXPANSION
    dw_pw = torch.einsum(
        "giehw,goie->goihw",
        p["weight_dw"].reshape(g, ig, e, kh, kw),
        p["weight_pw"].reshape(g, co // g, ig, e),
    ).reshape(co, ig, kh, kw)
    branches = (origin, avg, prior, one_then_k, p["weight_kxk"], dw_pw)
    scale = p["branch_scale"]
    return sum(scale[i][:, None, None, None] * kernel for i, kernel in enumerate(branches))


class BranchConv2d(WidthSliced):
    """A conv trained as six CBR branches; forward and export use their folded kernel."""

    _DENSE_ROLES = {
        "weight_origin": _DENSE_WEIGHT,
        "weight_avg": _DENSE_WEIGHT,
        "weight_prior_1x1": _DENSE_WEIGHT,
        "prior": _PER_OUT_CHANNEL,
        "weight_id_residual": _Role(((0, "in"), (1, "in")), divide="in"),  # (internal = input channels, in)
        "identity": _Role(((0, "in"), (1, "in")), divide="in"),
        "weight_kxk_after_1x1": _DENSE_WEIGHT,
        "weight_kxk": _DENSE_WEIGHT,
        "weight_dw": _Role(((0, "in"),)),
        "weight_pw": _DENSE_WEIGHT,
        "branch_scale": _Role(((1, "out"),)),
        "bias": _DENSE_BIAS,
    }
    # Grouped: every tensor is per output (or internal / depthwise) channel; in-group sizes do not grow.
    _GROUPED_ROLES = {
        **{name: _PER_OUT_CHANNEL for name in _DENSE_ROLES},
        "weight_id_residual": _Role(((0, "in"),)),
        "identity": _Role(((0, "in"),)),
        "weight_dw": _Role(((0, "in"),)),
        "branch_scale": _Role(((1, "out"),)),
    }
    _PARAMETERS = (
        "weight_origin",
        "weight_avg",
        "weight_prior_1x1",
        "weight_id_residual",
        "weight_kxk_after_1x1",
        "weight_kxk",
        "weight_dw",
        "weight_pw",
        "branch_scale",
        "bias",
    )

    def __init__(
        self,
        conv: nn.Conv2d,
        ratio_in: int,
        ratio_out: int,
        init: str = "multi",
        noise_std: float = GPD_IR_NOISE_STD,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__(ratio_in, ratio_out)
        if init not in CBR_INITS:
            raise ValueError(f"cbr_init must be one of {CBR_INITS}, got {init!r}")
        if conv.kernel_size[0] != conv.kernel_size[1] or conv.padding != (conv.kernel_size[0] // 2,) * 2:
            raise ValueError(f"CBR needs a square kernel with 'same' padding, got {conv}")
        _check_grouped(conv, ratio_in, ratio_out)
        self.geometry = _conv_geometry(conv)
        self.kernel_size = conv.kernel_size
        self.student_in_channels, self.student_out_channels = conv.in_channels, conv.out_channels
        self.student_groups = conv.groups
        self.groups = conv.groups * ratio_out if conv.groups > 1 else 1
        roles = self._GROUPED_ROLES if conv.groups > 1 else self._DENSE_ROLES
        values = _student_branches(conv, init, generator)
        for name, value in values.items():
            self._register(name, value, roles[name], parameter=name in self._PARAMETERS)
            self._inverse_reparameterize(name, value, noise_std, generator)

    def branch_tensors(self, width: str) -> Dict[str, Optional[torch.Tensor]]:
        return {name: self.tensor_at(name, width) for name in self._roles}

    def fold(self, width: Optional[str] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(kernel, bias) of the one conv equal to all branches at ``width`` (default: the current one)."""
        width = self.width if width is None else width
        groups = self.student_groups if width == STUDENT else self.groups
        return fold_branches(self.branch_tensors(width), groups), self.tensor_at("bias", width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.fold()
        if self.width == STUDENT:
            return F.conv2d(x, weight, bias, groups=self.student_groups, **self.geometry)
        if self.groups > 1 and bias is not None:
            bias = bias / self.ratio_out
        return F.conv2d(x, weight, bias, groups=self.groups, **self.geometry)

    @torch.no_grad()
    def to_plain(self) -> nn.Conv2d:
        weight, bias = self.fold(STUDENT)
        return _plain_conv(self, weight, bias)


# --------------------------------------------------------------------------------------------
# Model conversion


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _default_stem_and_head(model: nn.Module) -> Tuple[str, str]:
    convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    if not convs and not linears:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer to widen")
    stem = convs[0] if convs else linears[0]
    head = linears[-1] if linears else convs[-1]
    return stem, head


def _names(given: Optional[Sequence[str]], default: str, model: nn.Module, what: str) -> set:
    if given is None:
        return {default}
    names = {given} if isinstance(given, str) else set(given)
    modules = dict(model.named_modules())
    for name in names:
        if type(modules.get(name)) not in (nn.Conv2d, nn.Linear):
            raise ValueError(f"{what} {name!r} is not a Conv2d or Linear module of {type(model).__name__}")
    return names


def widen(
    student: nn.Module,
    ratio: int = GPD_RATIO,
    *,
    cbr: bool | Callable[[str, nn.Conv2d], bool] = True,
    cbr_init: str = "multi",
    noise_std: float = GPD_IR_NOISE_STD,
    stem: Optional[Sequence[str]] = None,
    head: Optional[Sequence[str]] = None,
    generator: Optional[torch.Generator] = None,
    example_input: Optional[torch.Tensor] = None,
    tolerance: float = 5e-2,
) -> nn.Module:
    """A copy of ``student`` whose layers are width-sliced: at ``STUDENT`` width it is the student,
    at ``DYNAMIC_TEACHER`` width the student widened ``ratio`` times, initialised by IR.

    Every ``Conv2d``, ``Linear``, ``BatchNorm2d`` and ``Hardtanh``/``ReLU6`` is swapped; all
    channels widen except the input of the ``stem`` (default: the first Conv2d) and the output
    of the ``head`` (default: the last Linear). ``cbr``: True applies CBR to the convs of
    ``cbr_eligible``; a callable ``(name, conv) -> bool`` chooses; False disables it. With CBR
    ``"multi"`` (from scratch, as released) the student's function changes (random extra
    branches), with ``"single"`` it is kept. Any other module holding parameters, or a
    non-homogeneous activation module, raises ValueError. ``example_input``: the teacher and
    student logits are compared (``ir_gap``, batch statistics) and a gap above ``tolerance`` times
    the largest student logit raises: IR leaves float rounding (~1e-5 relative in float32) with
    ``noise_std=0`` and up to ~1e-2 with the released noise on small nets; a model that mixes
    channel blocks leaves O(1). The returned model starts at ``STUDENT`` width; ``student`` is not modified.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"GPD ratio must be a positive int, got {ratio!r}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if cbr_init not in CBR_INITS:
        raise ValueError(f"cbr_init must be one of {CBR_INITS}, got {cbr_init!r}")
    if any(isinstance(m, WidthSliced) for m in student.modules()):
        raise ValueError(f"{type(student).__name__} is already widened")
    model = copy.deepcopy(student)
    default_stem, default_head = _default_stem_and_head(model)
    stems = _names(stem, default_stem, model, "stem")
    heads = _names(head, default_head, model, "head")
    choose = cbr if callable(cbr) else (lambda name, conv: bool(cbr) and cbr_eligible(conv))
    for name, module in list(model.named_modules()):
        kind = type(module)
        ratio_in = 1 if name in stems else ratio
        ratio_out = 1 if name in heads else ratio
        if kind is nn.Conv2d:
            if choose(name, module):
                new = BranchConv2d(module, ratio_in, ratio_out, cbr_init, noise_std, generator)
            else:
                new = SlicedConv2d(module, ratio_in, ratio_out, noise_std, generator)
        elif kind is nn.Linear:
            new = SlicedLinear(module, ratio_in, ratio_out, noise_std, generator,
                               out_blocks=getattr(module, "gpd_out_blocks", 1))
        elif kind is nn.BatchNorm2d:
            new = SlicedBatchNorm2d(module, ratio, noise_std, generator)
        elif kind is nn.LayerNorm:
            new = SlicedLayerNorm(module, ratio, noise_std, generator)
        elif kind is nn.GELU:
            new = SlicedGELU(module, ratio)
        elif kind in (nn.Hardtanh, nn.ReLU6):
            new = SlicedHardtanh(module, ratio)
        elif isinstance(module, _NON_HOMOGENEOUS):
            raise ValueError(
                f"cannot widen {name!r} ({kind.__name__}): f(x / r) != f(x) / r, so the dynamic teacher "
                "could not start equal to the student"
            )
        elif any(n not in _channel_parameter_names(module) for n, _ in module.named_parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        ):
            raise ValueError(f"cannot widen {name!r}: no width-sliced version of {kind.__name__}")
        else:
            _widen_channel_parameters(module, ratio, noise_std, generator)
            continue
        new.train(module.training)
        _set_submodule(model, name, new)
    set_width(model, STUDENT)
    if example_input is not None:
        gap, scale = ir_gap(model, example_input)
        if gap > tolerance * scale:
            raise ValueError(
                f"widen: the dynamic teacher's logits differ from the student's by {gap:.3g} (max |logit| "
                f"{scale:.3g}); the model likely concatenates, shuffles or reshapes channels, or applies a "
                "non-homogeneous function, which width slicing does not support"
            )
    return model


def _channel_parameter_names(module: nn.Module) -> Tuple[str, ...]:
    return tuple(getattr(module, "gpd_channel_parameters", ()))


@torch.no_grad()
def _widen_channel_parameters(module: nn.Module, ratio: int, noise_std: float, generator) -> None:
    """Parameters added to hidden activations along their last dim (a transformer's class token and
    position embedding), named by the module's ``gpd_channel_parameters``: tiled ``ratio`` times
    and divided by it (the teacher's activation scale); the module reads them through
    :func:`channel_parameter`, which gives the student its leading slice times ``ratio``."""
    for name in _channel_parameter_names(module):
        value = getattr(module, name)
        full = value.detach().repeat(*([1] * (value.dim() - 1)), ratio) / ratio
        if noise_std > 0:
            noise = torch.randn(full.shape, generator=generator, dtype=full.dtype).to(full.device) * noise_std
            noise[..., : value.shape[-1]] = 0
            full = full + noise
        setattr(module, name, nn.Parameter(full, requires_grad=value.requires_grad))


def channel_parameter(tensor: torch.Tensor, channels: int) -> torch.Tensor:
    """The view of a channel parameter (see ``gpd_channel_parameters``) for activations of ``channels``
    channels: the whole tensor at its own width, else its leading ``channels`` times the ratio. On a
    plain model this is the tensor itself, so a model can always read its parameters through it."""
    full = tensor.shape[-1]
    if full == channels:
        return tensor
    if full % channels:
        raise ValueError(f"a {full}-channel parameter cannot serve {channels}-channel activations")
    return tensor[..., :channels] * (full // channels)


def _export_channel_parameters(plain: nn.Module, ratio: int) -> None:
    for module in plain.modules():
        for name in _channel_parameter_names(module):
            value = getattr(module, name)
            student = value.detach()[..., : value.shape[-1] // ratio] * ratio
            setattr(module, name, nn.Parameter(student.clone(), requires_grad=value.requires_grad))


def _sliced(model: nn.Module) -> Iterator[WidthSliced]:
    return (m for m in model.modules() if isinstance(m, WidthSliced))


def set_width(model: nn.Module, width: str) -> nn.Module:
    """Run every width-sliced layer of ``model`` at ``STUDENT`` or ``DYNAMIC_TEACHER`` width."""
    if width not in WIDTHS:
        raise ValueError(f"width must be one of {WIDTHS}, got {width!r}")
    for module in _sliced(model):
        module.width = width
    return model


@contextlib.contextmanager
def at_width(model: nn.Module, width: str):
    """``with at_width(model, DYNAMIC_TEACHER): logits = model(x)``; the previous widths come back after."""
    previous = [(m, m.width) for m in _sliced(model)]
    set_width(model, width)
    try:
        yield model
    finally:
        for module, old in previous:
            module.width = old


def gpd_ratio(model: nn.Module) -> int:
    """The widening ratio of a widened model (1 for a plain one)."""
    return max((max(m.ratio_in, m.ratio_out) for m in _sliced(model)), default=1)


@torch.no_grad()
def ir_gap(model: nn.Module, x: torch.Tensor, batch_statistics: bool = True) -> Tuple[float, float]:
    """``(max |dynamic-teacher logits - student logits|, max |student logit|)`` on ``x``.

    ``batch_statistics=True`` runs a copy in train mode (BN normalises with the batch, as in
    training; nothing of ``model`` is updated) with dropout off, so the two forwards see the same
    function; ``False`` runs ``model`` itself in eval mode (running statistics).
    """
    if batch_statistics:
        probe = copy.deepcopy(model).train()
        for module in probe.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.eval()
    else:
        probe = model
    modes = [(m, m.training) for m in model.modules()]
    if not batch_statistics:
        model.eval()
    try:
        with at_width(probe, STUDENT):
            student_logits = probe(x)
        with at_width(probe, DYNAMIC_TEACHER):
            teacher_logits = probe(x)
    finally:
        for module, mode in modes:
            module.training = mode
    return (teacher_logits - student_logits).abs().max().item(), student_logits.abs().max().item()


def export(model: nn.Module) -> nn.Module:
    """The plain student: a copy with every sliced layer replaced by its ordinary student-width module.

    CBR branches are folded into one kernel; BN layers take the student's running statistics.
    The result keeps the original classes and names, so its state dict loads (strictly) into a
    freshly built student of the same class. ``model`` is not modified, and neither are the
    global random streams (building the plain layers runs their random init; a trainer that
    exports while training must draw the same numbers afterwards, resumed or not).
    """
    with preserve_rng_state():
        ratio = gpd_ratio(model)
        plain = copy.deepcopy(model)
        for name, module in list(plain.named_modules()):
            if isinstance(module, WidthSliced):
                _set_submodule(plain, name, module.to_plain())
        if ratio > 1:
            _export_channel_parameters(plain, ratio)
    return plain


def gpd_soft_target_loss(
    student_logits: torch.Tensor,
    dynamic_teacher_logits: torch.Tensor,
    smoothing: float = GPD_SOFT_TARGET_SMOOTHING,
) -> torch.Tensor:
    """The released dynamic-teacher -> student term ("sce", docs/gpd.md §5), without its weight.

    Cross-entropy to the dynamic teacher's softmax (temperature 1, no gradient to the teacher),
    label-smoothed: ``(1 - s) * mean_i(-sum_c p_c log q_c) + s * mean_i(-mean_c log q_c)``.
    """
    if not 0 <= smoothing <= 1:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    target = F.softmax(dynamic_teacher_logits.detach(), dim=1)
    log_q = F.log_softmax(student_logits, dim=1)
    soft_ce = -(target * log_q).sum(dim=1)
    uniform_ce = -log_q.mean(dim=1)
    return ((1 - smoothing) * soft_ce + smoothing * uniform_ce).mean()
