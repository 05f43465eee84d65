"""DiffKD: knowledge diffusion for distillation (Huang et al., NeurIPS 2023, arXiv 2305.15712).

The student's feature is treated as a noisy version of the teacher's. A light noise-prediction
network ``Phi`` is trained on the *teacher* feature ``z0`` with the standard diffusion loss

    x_t = sqrt(abar_t) * z0 + sqrt(1 - abar_t) * eps,   L_diff = mean((Phi(x_t, t) - eps)^2)

(linear beta schedule 1e-4 .. 0.02 over 1000 training timesteps, no clipping). The student
feature, projected to the teacher's channels (``z_s``), is mixed with Gaussian noise by a
predicted per-sample weight ``gamma`` (the noise adapter), ``x = gamma * z_s + (1 - gamma) * eps``,
and denoised by deterministic DDIM (eta = 0) with ``Phi``. As released, the sampler is set to
``2 * steps`` inference steps and only the second half is run (5 steps: t = 400, 300, 200, 100, 0;
the last one lands on abar = 1). A final projection, a 1x1 convolution followed by batch norm (as
released), gives the denoised student, compared with the teacher by ``L_kd`` (MSE for feature maps, KL at temperature 1 for logits).
``kd_loss="attention_mse"`` (feature maps, the paper's detection variant marked with a dagger)
weights each squared error by the teacher's spatial and channel attention
(:func:`attention_weighted_mse`); ``kd_loss="bkl"`` compares maps of sigmoid logits (a dense head's
classification outputs) by the binary KL of :func:`deepkd_det.core.dense_kd.binary_kl`.

With an autoencoder (for wide teacher features) a linear 1x1 encoder + BN and 1x1 decoder are
trained by ``L_ae = mean((dec(enc(F_t)) - F_t)^2)``; diffusion and KD then work on the detached
latent ``enc(F_t)``.

Everything here is training-only: callers register a :class:`DiffKD` under an attribute named
``diffkd`` (state-dict keys ``diffkd.*``, :data:`DIFFKD_PREFIX`) and drop those keys from exported
students with :func:`drop_diffkd_keys`.

Randomness: the start noise, the diffusion-loss noise and the diffusion-loss timesteps are drawn,
in that order, from ``generator`` when one is passed to :meth:`DiffKD.forward`, otherwise from
the global torch RNG of the feature's device (``torch.get_rng_state`` on CPU,
``torch.cuda.get_rng_state`` on CUDA), which the trainers save in their checkpoints, so an exact
resume replays the same noise. A caller that passes its own generator must save its state.

The DDIM scheduler (``set_timesteps``, ``step``, ``add_noise``) is ``diffusers.DDIMScheduler``,
imported when the first :class:`DiffKD` is built because importing diffusers takes seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dense_kd import binary_kl
from .losses import kd_loss

__all__ = [
    "DIFFKD_ATTENTION_TEMPERATURE",
    "DIFFKD_BETA_END",
    "DIFFKD_BETA_START",
    "DIFFKD_INFERENCE_STEPS",
    "DIFFKD_KINDS",
    "DIFFKD_KD_LOSSES",
    "DIFFKD_LOSS_KEYS",
    "DIFFKD_LOSS_WEIGHTS",
    "DIFFKD_PREFIX",
    "DIFFKD_TRAIN_TIMESTEPS",
    "Bottleneck",
    "DiffKD",
    "DiffKDOutput",
    "FeatureDenoiser",
    "FeatureNoiseAdapter",
    "LinearAutoEncoder",
    "LogitDenoiser",
    "LogitNoiseAdapter",
    "attention_weighted_mse",
    "ddim_denoise",
    "diffkd_kd_loss",
    "diffkd_total",
    "diffusion_loss",
    "drop_diffkd_keys",
    "feature_attention",
    "make_ddim_scheduler",
    "noise_matched_start",
    "reverse_timesteps",
]

DIFFKD_PREFIX = "diffkd."
DIFFKD_TRAIN_TIMESTEPS = 1000  # paper and release
DIFFKD_BETA_START, DIFFKD_BETA_END = 1e-4, 0.02  # release (diffusers' linear-schedule defaults)
DIFFKD_INFERENCE_STEPS = 5  # paper and release
DIFFKD_KINDS = ("feature", "logits")
DIFFKD_KD_LOSSES = ("mse", "kl", "attention_mse", "bkl")
# Temperature of the attention maps of the attention-weighted MSE (FGD's and Zhang & Ma's 0.5).
DIFFKD_ATTENTION_TEMPERATURE = 0.5
DIFFKD_LOSS_KEYS = ("diff", "ae", "kd")
# L = L_task + l1 L_diff + l2 L_ae + l3 L_kd with l1 = l2 = 1 (paper); l3 is per task (1 in
# classification, the paper's detection runs use 5), so callers set it.
DIFFKD_LOSS_WEIGHTS = {"diff": 1.0, "ae": 1.0, "kd": 1.0}


# ----------------------------------------------------------------------------------------------
# Scheduler and the maths of one pass
# ----------------------------------------------------------------------------------------------


def make_ddim_scheduler(
    num_train_timesteps: int = DIFFKD_TRAIN_TIMESTEPS,
    beta_start: float = DIFFKD_BETA_START,
    beta_end: float = DIFFKD_BETA_END,
    inference_steps: int = DIFFKD_INFERENCE_STEPS,
) -> Any:
    """A ``diffusers.DDIMScheduler`` with DiffKD's settings, its timesteps set to ``2 * inference_steps``.

    Linear betas, epsilon prediction, no clipping or thresholding, ``abar = 1`` after the last
    step, "leading" spacing (t = k * (T // (2 * steps))), as the release sets it up.
    """
    if int(inference_steps) < 1:
        raise ValueError(f"inference_steps must be a positive integer, got {inference_steps}")
    if 2 * int(inference_steps) > int(num_train_timesteps):
        raise ValueError(
            f"2 * inference_steps ({2 * int(inference_steps)}) must not exceed num_train_timesteps "
            f"({num_train_timesteps})"
        )
    if not 0.0 < beta_start < beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start} and {beta_end}")
    # Imported here: `import diffusers` costs about 3.5 s (it pulls in torch._dynamo), which
    # every user of deepkd_det.core would otherwise pay.
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        num_train_timesteps=int(num_train_timesteps),
        beta_start=float(beta_start),
        beta_end=float(beta_end),
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        thresholding=False,
        timestep_spacing="leading",
    )
    scheduler.set_timesteps(2 * int(inference_steps))
    return scheduler


def reverse_timesteps(scheduler: Any) -> torch.Tensor:
    """The timesteps the student is denoised through: the second half of the scheduler's schedule.

    The release sets ``2 * steps`` inference steps and starts from the middle, because the
    noise-matched start is far less noisy than pure noise.
    """
    timesteps = scheduler.timesteps
    return timesteps[len(timesteps) // 2:]


def noise_matched_start(student: torch.Tensor, noise: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``gamma * student + (1 - gamma) * noise`` with one ``gamma`` per sample (shape (N,)).

    As released: the weights are ``gamma`` and ``1 - gamma``, not a variance-preserving pair.
    """
    if gamma.dim() != 1 or gamma.shape[0] != student.shape[0]:
        raise ValueError(f"gamma must have shape ({student.shape[0]},), got {tuple(gamma.shape)}")
    g = gamma.view(-1, *([1] * (student.dim() - 1)))
    return g * student + (1.0 - g) * noise


def diffusion_loss(
    denoiser: nn.Module, scheduler: Any, z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """``mean((Phi(sqrt(abar_t) z0 + sqrt(1 - abar_t) noise, t) - noise)^2)``, t per sample."""
    noisy = scheduler.add_noise(z0, noise, timesteps)
    return F.mse_loss(denoiser(noisy, timesteps), noise)


def ddim_denoise(denoiser: nn.Module, scheduler: Any, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from ``x`` through ``timesteps`` (descending).

    Each step: ``x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)``,
    ``x <- sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps`` with ``eps = Phi(x, t)``. Differentiable:
    gradients flow through every step into ``x`` and ``Phi``.
    """
    for t in timesteps:
        eps = denoiser(x, t)
        # The release also passes use_clipped_model_output=True, which re-derives eps from x0:
        # without clipping that changes only rounding (measured: 5e-6 max over 5 steps) and costs
        # three more element-wise passes per step, so it is left out.
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x


def feature_attention(teacher: torch.Tensor, temperature: float = DIFFKD_ATTENTION_TEMPERATURE):
    """Spatial and channel attention of a (N, C, H, W) map, each scaled to average 1 per sample.

    ``spatial[n, 0, h, w] = H W softmax_{h,w}(mean_c |F[n, c, h, w]| / tau)`` and
    ``channel[n, c, 0, 0] = C softmax_c(mean_{h,w} |F[n, c, h, w]| / tau)`` (the attention of FGD and of
    Zhang & Ma's attention-guided distillation). Computed without gradient, in at least float32.
    """
    if teacher.dim() != 4:
        raise ValueError(f"feature attention needs (N, C, H, W) maps, got shape {tuple(teacher.shape)}")
    if not temperature > 0:
        raise ValueError(f"attention temperature must be positive, got {temperature}")
    n, c, h, w = teacher.shape
    a = teacher.detach()
    a = (a if a.dtype == torch.float64 else a.float()).abs()
    spatial = (a.mean(dim=1).reshape(n, h * w) / temperature).softmax(dim=1).reshape(n, 1, h, w) * (h * w)
    channel = (a.mean(dim=(2, 3)) / temperature).softmax(dim=1).reshape(n, c, 1, 1) * c
    return spatial, channel


def attention_weighted_mse(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = DIFFKD_ATTENTION_TEMPERATURE
) -> torch.Tensor:
    """``mean_{n,c,h,w} spatial[n,h,w] * channel[n,c] * (F_s - F_t)^2`` with the *teacher's* attention.

    The attention (:func:`feature_attention`) averages 1 over positions and over channels, so where it is
    uniform the loss is exactly ``F.mse_loss(student, teacher)``: it is a drop-in reweighting of the
    plain MSE and keeps its loss weight. The teacher is detached.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same shape")
    spatial, channel = feature_attention(teacher, temperature)
    diff = student - teacher.detach()
    return (spatial * channel * diff * diff).mean()


def diffkd_kd_loss(
    denoised: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    temperature: float = 1.0,
    attention_temperature: float = DIFFKD_ATTENTION_TEMPERATURE,
) -> torch.Tensor:
    """``d(denoised student, teacher)``: ``"mse"`` (mean squared error), ``"kl"`` (``T^2 KL(p_t || p_s)``
    over dim 1, mean over rows), ``"attention_mse"`` (:func:`attention_weighted_mse`, feature maps) or
    ``"bkl"`` (``T^2`` binary KL of sigmoid logits, :func:`deepkd_det.core.dense_kd.binary_kl`, mean over
    all elements). The target is detached."""
    target = target.detach()
    if kind == "mse":
        return F.mse_loss(denoised, target)
    if kind == "kl":
        if denoised.dim() != 2:
            raise ValueError(f"the 'kl' KD loss needs (N, C) logits, got shape {tuple(denoised.shape)}")
        return kd_loss(denoised, target, temperature=temperature)
    if kind == "attention_mse":
        return attention_weighted_mse(denoised, target, attention_temperature)
    if kind == "bkl":
        return binary_kl(denoised, target, temperature).mean()
    raise ValueError(f"kd_loss must be one of {DIFFKD_KD_LOSSES}, got {kind!r}")


def diffkd_total(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float] = DIFFKD_LOSS_WEIGHTS) -> torch.Tensor:
    """``sum_k weights[k] * losses[k]`` over ``diff``, ``ae``, ``kd`` (a missing weight is an error)."""
    missing = [k for k in DIFFKD_LOSS_KEYS if k not in weights]
    if missing:
        raise ValueError(f"DiffKD loss weights lack {missing}; expected keys {DIFFKD_LOSS_KEYS}")
    return sum(float(weights[k]) * losses[k] for k in DIFFKD_LOSS_KEYS)


def drop_diffkd_keys(state_dict: Mapping[str, Any], prefix: str = DIFFKD_PREFIX) -> Dict[str, Any]:
    """A copy of ``state_dict`` without the training-only DiffKD entries (keys starting with ``prefix``)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(prefix)}


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """ResNet bottleneck with identity shortcut: 1x1 -> 3x3 -> 1x1 convs with BN (ReLU between), plus ``x``."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.block = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class _TimeEmbedded(nn.Module):
    """Adds a learned embedding of the timestep (one vector per timestep) to the input, then ``self.net``."""

    def __init__(self, channels: int, num_timesteps: int):
        super().__init__()
        self.time_embedding = nn.Embedding(num_timesteps, channels)

    def embed(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).long()
        emb = self.time_embedding(t)  # (C,) for one shared t, (N, C) for one t per sample
        return x + emb.view(*emb.shape, *([1] * (x.dim() - 2)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(self.embed(x, t))


class FeatureDenoiser(_TimeEmbedded):
    """Noise prediction for (N, C, H, W): ``Phi(x, t) = BN(conv1x1(B2(B1(x + E[t]))))``."""

    def __init__(self, channels: int, num_timesteps: int = DIFFKD_TRAIN_TIMESTEPS):
        super().__init__(channels, num_timesteps)
        self.net = nn.Sequential(
            Bottleneck(channels), Bottleneck(channels), nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels)
        )


class LogitDenoiser(_TimeEmbedded):
    """Noise prediction for (N, C): an MLP (C -> 4C -> C -> 4C -> C) on ``x + E[t]``.

    The layers of the release's 1x1-conv variant on (N, C, 1, 1), written as linear layers.
    """

    def __init__(self, channels: int, num_timesteps: int = DIFFKD_TRAIN_TIMESTEPS):
        super().__init__(channels, num_timesteps)
        wide = 4 * channels
        self.net = nn.Sequential(
            nn.Linear(channels, wide),
            nn.BatchNorm1d(wide),
            nn.ReLU(inplace=True),
            nn.Linear(wide, channels),
            nn.BatchNorm1d(channels),
            nn.Linear(channels, wide),
            nn.BatchNorm1d(wide),
            nn.ReLU(inplace=True),
            nn.Linear(wide, channels),
        )


class _NoiseAdapter(nn.Module):
    """Predicts the per-sample weight of the student: ``gamma = softmax(linear(features(x)))[:, 0]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pred(self.features(x).flatten(1)).softmax(dim=1)[:, 0]


class FeatureNoiseAdapter(_NoiseAdapter):
    """Bottleneck (reduction 8) + global average pooling + linear to 2 + softmax."""

    def __init__(self, channels: int):
        super().__init__()
        self.features = nn.Sequential(Bottleneck(channels, reduction=8), nn.AdaptiveAvgPool2d(1))
        self.pred = nn.Linear(channels, 2)


class LogitNoiseAdapter(_NoiseAdapter):
    """MLP (C -> 2C -> C with BN) + linear to 2 + softmax, the release's 1x1 variant."""

    def __init__(self, channels: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Linear(channels, 2 * channels),
            nn.BatchNorm1d(2 * channels),
            nn.ReLU(inplace=True),
            nn.Linear(2 * channels, channels),
            nn.BatchNorm1d(channels),
        )
        self.pred = nn.Linear(channels, 2)


class LinearAutoEncoder(nn.Module):
    """``enc = BN(conv1x1(x))`` to ``latent_channels``, ``dec = conv1x1(enc)`` back; returns (latent, reconstruction)."""

    def __init__(self, channels: int, latent_channels: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(channels, latent_channels, 1), nn.BatchNorm2d(latent_channels))
        self.decoder = nn.Conv2d(latent_channels, channels, 1)

    def forward(self, x: torch.Tensor):
        latent = self.encoder(x)
        return latent, self.decoder(latent)


# ----------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------


@dataclass
class DiffKDOutput:
    """What one DiffKD pass gives its caller.

    ``denoised``: the denoised, projected student (the teacher's or the latent's shape; carries
    gradient to the student). ``target``: the detached teacher feature it is compared with (the
    latent with an autoencoder). ``losses``: ``{"diff", "ae", "kd"}`` scalars (``ae`` is 0 without
    an autoencoder), unweighted. ``gamma``: the per-sample student weight of the start point.
    """

    denoised: torch.Tensor
    target: torch.Tensor
    losses: Dict[str, torch.Tensor]
    gamma: torch.Tensor


class DiffKD(nn.Module):
    """DiffKD between one student feature and one teacher feature (see the module docstring).

    ``kind="feature"``: (N, C, H, W) maps; 1x1-conv student projection, bottleneck denoiser and
    noise adapter, optional autoencoder (``ae_channels``), MSE KD loss by default
    (``kd_loss="attention_mse"``: the attention-weighted MSE with ``attention_temperature``;
    ``kd_loss="bkl"``: binary KL at ``temperature``, for maps of sigmoid logits).
    ``kind="logits"``: (N, C) vectors; linear projection (or none with ``project_student=False``
    when the channel counts agree), MLP denoiser and adapter, no autoencoder, KL (T = 1) KD loss
    by default. Student and teacher must agree in everything but channels.

    Submodules: ``student_proj``, ``noise_adapter``, ``denoiser``, ``out_proj`` (1x1 conv or linear,
    then batch norm), ``autoencoder``
    (None without one); ``scheduler`` is a diffusers DDIMScheduler (not a module: no state).
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        kind: str = "feature",
        inference_steps: int = DIFFKD_INFERENCE_STEPS,
        num_train_timesteps: int = DIFFKD_TRAIN_TIMESTEPS,
        beta_start: float = DIFFKD_BETA_START,
        beta_end: float = DIFFKD_BETA_END,
        ae_channels: Optional[int] = None,
        kd_loss: Optional[str] = None,
        temperature: float = 1.0,
        project_student: bool = True,
        attention_temperature: float = DIFFKD_ATTENTION_TEMPERATURE,
    ):
        super().__init__()
        if kind not in DIFFKD_KINDS:
            raise ValueError(f"kind must be one of {DIFFKD_KINDS}, got {kind!r}")
        for name, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if ae_channels is not None and kind != "feature":
            raise ValueError("ae_channels: the autoencoder is for feature maps only (kind='feature')")
        if ae_channels is not None and int(ae_channels) < 1:
            raise ValueError(f"ae_channels must be a positive integer or None, got {ae_channels}")
        kd_loss = kd_loss if kd_loss is not None else ("mse" if kind == "feature" else "kl")
        if kd_loss not in DIFFKD_KD_LOSSES:
            raise ValueError(f"kd_loss must be one of {DIFFKD_KD_LOSSES}, got {kd_loss!r}")
        if kd_loss == "kl" and kind != "logits":
            raise ValueError("kd_loss='kl' compares logits: use it with kind='logits'")
        if kd_loss == "attention_mse" and kind != "feature":
            raise ValueError("kd_loss='attention_mse' weights feature maps: use it with kind='feature'")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not attention_temperature > 0:
            raise ValueError(f"attention_temperature must be positive, got {attention_temperature}")

        self.kind = kind
        self.kd_loss_kind = kd_loss
        self.temperature = float(temperature)
        self.attention_temperature = float(attention_temperature)
        self.inference_steps = int(inference_steps)
        self.num_train_timesteps = int(num_train_timesteps)
        self.scheduler = make_ddim_scheduler(num_train_timesteps, beta_start, beta_end, inference_steps)
        # A CPU tensor on purpose (not a buffer): the scheduler indexes its CPU tables with it.
        self.timesteps = reverse_timesteps(self.scheduler).clone()

        self.student_channels = int(student_channels)
        self.teacher_channels = int(teacher_channels)
        channels = int(teacher_channels)
        self.autoencoder = LinearAutoEncoder(channels, int(ae_channels)) if ae_channels is not None else None
        if ae_channels is not None:
            channels = int(ae_channels)  # diffusion and KD work in the latent
        self.channels = channels
        if kind == "feature":
            self.student_proj = nn.Conv2d(student_channels, channels, 1)
            self.noise_adapter = FeatureNoiseAdapter(channels)
            self.denoiser = FeatureDenoiser(channels, self.num_train_timesteps)
            # As released: a 1x1 convolution, then batch norm.
            self.out_proj = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))
        else:
            if project_student:
                self.student_proj = nn.Linear(student_channels, channels)
            elif int(student_channels) == channels:
                self.student_proj = nn.Identity()
            else:
                raise ValueError(
                    f"project_student=False needs equal channels, got student {student_channels} and "
                    f"teacher {channels}"
                )
            self.noise_adapter = LogitNoiseAdapter(channels)
            self.denoiser = LogitDenoiser(channels, self.num_train_timesteps)
            # The release's 1x1 convolution + BatchNorm2d on (N, C, 1, 1), written for (N, C).
            self.out_proj = nn.Sequential(nn.Linear(channels, channels), nn.BatchNorm1d(channels))

    def _check(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        dims = 4 if self.kind == "feature" else 2
        layout = "(N, C, H, W)" if dims == 4 else "(N, C)"
        for name, x in (("student", student), ("teacher", teacher)):
            if x.dim() != dims:
                raise ValueError(f"DiffKD(kind={self.kind!r}) takes {layout} tensors; {name} has shape {tuple(x.shape)}")
        if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
            raise ValueError(
                f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must agree in all but channels"
            )
        for name, x, expected in (("student", student, self.student_channels),
                                  ("teacher", teacher, self.teacher_channels)):
            if x.shape[1] != expected:
                raise ValueError(f"{name} has {x.shape[1]} channels; this DiffKD was built for {expected}")

    def _randn(self, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    def denoise(self, student: torch.Tensor, generator: Optional[torch.Generator] = None):
        """Project, noise-match and DDIM-denoise the student; returns ``(denoised, gamma)``."""
        z_s = self.student_proj(student)
        gamma = self.noise_adapter(z_s)
        x = noise_matched_start(z_s, self._randn(z_s, generator), gamma)
        x = ddim_denoise(self.denoiser, self.scheduler, x, self.timesteps)
        return self.out_proj(x), gamma

    def diffusion_loss(self, target: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """L_diff on the (detached) teacher target, with fresh noise and one random t per sample."""
        target = target.detach()
        noise = self._randn(target, generator)
        t = torch.randint(0, self.num_train_timesteps, (target.shape[0],), generator=generator, device=target.device)
        return diffusion_loss(self.denoiser, self.scheduler, target, noise, t)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> DiffKDOutput:
        """One DiffKD pass. ``teacher`` is detached here; ``generator`` (optional) must be on the features' device."""
        self._check(student, teacher)
        teacher = teacher.detach()
        if self.autoencoder is not None:
            latent, reconstruction = self.autoencoder(teacher)
            ae = F.mse_loss(reconstruction, teacher)
            target = latent.detach()
        else:
            ae = student.new_zeros(())
            target = teacher
        denoised, gamma = self.denoise(student, generator)
        diff = self.diffusion_loss(target, generator)
        kd = diffkd_kd_loss(denoised, target, self.kd_loss_kind, self.temperature, self.attention_temperature)
        return DiffKDOutput(denoised=denoised, target=target, losses={"diff": diff, "ae": ae, "kd": kd}, gamma=gamma)
