"""DiffKD core: each formula against a direct computation on small tensors."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepkd_det.core.diffkd import (
    DIFFKD_LOSS_WEIGHTS,
    DIFFKD_PREFIX,
    DiffKD,
    ddim_denoise,
    diffkd_total,
    diffusion_loss,
    drop_diffkd_keys,
    make_ddim_scheduler,
    noise_matched_start,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def abar_direct(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02):
    """alpha-bar of the linear schedule, computed here in float64 without the scheduler."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def hand_ddim_step(x, eps, abar_t, abar_prev):
    """x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    x0 = (x - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)
    return math.sqrt(abar_prev) * x0 + math.sqrt(1.0 - abar_prev) * eps


class ZeroNoise(nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


class LinearNoise(nn.Module):
    """eps = c * x, so each DDIM step is x <- k_t x with a known k_t."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, t):
        return self.c * x


def test_schedule_and_reverse_timesteps():
    scheduler = make_ddim_scheduler()
    assert torch.allclose(scheduler.alphas_cumprod.double(), abar_direct(), rtol=1e-5, atol=0)
    # Second half of a 2 * steps "leading" schedule: t = k * (1000 // (2 * steps)), k = steps-1 .. 0.
    for steps in (5, 3, 1):
        module = DiffKD(4, 4, inference_steps=steps)
        ratio = 1000 // (2 * steps)
        assert module.timesteps.tolist() == [k * ratio for k in range(steps - 1, -1, -1)]
    assert DiffKD(4, 4).timesteps.tolist() == [400, 300, 200, 100, 0]


def test_diffusion_loss_at_fixed_timestep_and_noise():
    torch.manual_seed(0)
    module = DiffKD(6, 8).eval()
    z0 = torch.randn(3, 8, 4, 4)
    noise = torch.randn(3, 8, 4, 4)
    t = torch.tensor([0, 417, 999])
    abar = abar_direct()[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
    # The denoiser adds E[t] to its input before its layers.
    pred = module.denoiser.net(x_t + module.denoiser.time_embedding.weight[t][:, :, None, None])
    direct = ((pred - noise) ** 2).mean()
    got = diffusion_loss(module.denoiser, module.scheduler, z0, noise, t)
    assert torch.allclose(got, direct, rtol=1e-5, atol=1e-6)

    # The module's own draw: noise, then one t per sample, from the generator in that order.
    g = torch.Generator().manual_seed(7)
    noise_g = torch.randn(z0.shape, generator=g)
    t_g = torch.randint(0, 1000, (3,), generator=g)
    expected = diffusion_loss(module.denoiser, module.scheduler, z0, noise_g, t_g)
    assert torch.equal(module.diffusion_loss(z0, generator=torch.Generator().manual_seed(7)), expected)


def test_ddim_step_matches_hand_formula():
    scheduler = make_ddim_scheduler()
    # The scheduler's own float32 table (checked against the schedule above), so that the step
    # formula alone is under test here.
    abar = scheduler.alphas_cumprod.double()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for t in [400, 300, 200, 100, 0]:
        abar_prev = float(abar[t - 100]) if t >= 100 else 1.0  # past the last step abar = 1
        got = scheduler.step(eps, torch.tensor(t), x, eta=0.0).prev_sample
        assert torch.allclose(got, hand_ddim_step(x, eps, float(abar[t]), abar_prev), rtol=1e-5, atol=1e-6)
    # The last step lands on x0.
    last = scheduler.step(eps, torch.tensor(0), x, eta=0.0).prev_sample
    assert torch.allclose(last, (x - (1 - abar[0]).sqrt() * eps) / abar[0].sqrt(), rtol=1e-5, atol=1e-6)


def test_ddim_denoise_chain_and_its_gradient():
    module = DiffKD(4, 4)
    abar = module.scheduler.alphas_cumprod.double()
    c = 0.3
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    out = ddim_denoise(LinearNoise(c), module.scheduler, x, module.timesteps)
    # Hand loop, and the product of the per-step factors k_t (each step is linear in x).
    expected, factor = x.detach(), 1.0
    for t in [400, 300, 200, 100, 0]:
        a_t, a_prev = float(abar[t]), (float(abar[t - 100]) if t >= 100 else 1.0)
        expected = hand_ddim_step(expected, c * expected, a_t, a_prev)
        factor *= math.sqrt(a_prev) * (1 - c * math.sqrt(1 - a_t)) / math.sqrt(a_t) + c * math.sqrt(1 - a_prev)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out, factor * x.detach(), rtol=1e-5, atol=1e-6)
    out.sum().backward()  # gradient flows back through all five steps
    assert torch.allclose(x.grad, torch.full_like(x, factor), rtol=1e-5)


def test_gamma_mixing():
    torch.manual_seed(2)
    z, noise = torch.randn(3, 5, 2, 2), torch.randn(3, 5, 2, 2)
    gamma = torch.tensor([0.0, 0.25, 1.0])
    mixed = noise_matched_start(z, noise, gamma)
    for i in range(3):
        assert torch.allclose(mixed[i], gamma[i] * z[i] + (1 - gamma[i]) * noise[i])
    with pytest.raises(ValueError, match="gamma"):
        noise_matched_start(z, noise, gamma[:2])

    # End to end: with a zero noise prediction DDIM only rescales, so the denoised student is
    # (gamma z_s + (1 - gamma) eps) / sqrt(abar_400), eps the first draw of the generator.
    module = DiffKD(6, 5)
    module.denoiser, module.out_proj = ZeroNoise(), nn.Identity()
    student = torch.randn(3, 6, 2, 2)
    out = module(student, torch.randn(3, 5, 2, 2), generator=torch.Generator().manual_seed(3))
    z_s = module.student_proj(student)
    g = module.noise_adapter(z_s)
    assert g.shape == (3,) and bool(((g > 0) & (g < 1)).all())
    assert torch.allclose(out.gamma, g)
    eps = torch.randn(z_s.shape, generator=torch.Generator().manual_seed(3))
    g4 = g.view(-1, 1, 1, 1)
    expected = (g4 * z_s + (1 - g4) * eps) / math.sqrt(float(abar_direct()[400]))
    assert torch.allclose(out.denoised, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["feature", "logits"])
def test_output_projection_is_a_1x1_conv_then_batch_norm_as_released(kind):
    """With a zero noise prediction the DDIM chain only rescales its start, so the denoised student
    is out_proj(start / sqrt(abar_400)); out_proj is computed here by hand: a 1x1 convolution (a
    linear map for logits), then batch norm with the batch's statistics in training, and with the
    running statistics it updated (momentum 0.1, unbiased variance) in eval mode."""
    torch.manual_seed(11)
    module = DiffKD(6, 5, kind=kind).double()
    module.denoiser = ZeroNoise()
    shape = (4, 6, 3, 3) if kind == "feature" else (4, 6)
    student, teacher = torch.randn(shape, dtype=torch.float64), torch.randn((4, 5, *shape[2:]), dtype=torch.float64)
    with torch.no_grad():
        module.out_proj[1].weight.uniform_(0.5, 1.5)
        module.out_proj[1].bias.uniform_(-0.5, 0.5)
    out = module(student, teacher, generator=torch.Generator().manual_seed(5))
    z_s = module.student_proj(student)
    g = module.noise_adapter(z_s).view(-1, *([1] * (len(shape) - 1)))
    eps = torch.randn(z_s.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = (g * z_s + (1 - g) * eps) / math.sqrt(float(abar_direct()[400]))
    lin, bn = module.out_proj[0], module.out_proj[1]
    weight = lin.weight.reshape(5, 5)
    y = torch.einsum("oc,nc...->no...", weight, x) + lin.bias.view(1, -1, *([1] * (len(shape) - 2)))
    dims = (0, 2, 3) if kind == "feature" else (0,)
    view = (1, -1, 1, 1) if kind == "feature" else (1, -1)
    mean, var = y.mean(dim=dims, keepdim=True), y.var(dim=dims, unbiased=False, keepdim=True)
    expected = (y - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(view) + bn.bias.view(view)
    assert torch.allclose(out.denoised, expected, rtol=1e-9, atol=1e-9)
    if kind == "feature":
        kd = ((expected - teacher) ** 2).mean()
    else:  # KL(p_t || p_s) at T = 1, mean over rows
        kd = (teacher.softmax(1) * (teacher.log_softmax(1) - expected.log_softmax(1))).sum(1).mean()
    assert torch.allclose(out.losses["kd"], kd, rtol=1e-9)
    count = y.numel() // y.shape[1]
    running_mean, running_var = 0.1 * mean.flatten(), 0.9 + 0.1 * var.flatten() * count / (count - 1)
    assert torch.allclose(bn.running_mean, running_mean, rtol=1e-9) and torch.allclose(bn.running_var, running_var)
    module.eval()
    denoised, _ = module.denoise(student, generator=torch.Generator().manual_seed(5))
    z_s = module.student_proj(student)
    g = module.noise_adapter(z_s).view(-1, *([1] * (len(shape) - 1)))
    x = (g * z_s + (1 - g) * eps) / math.sqrt(float(abar_direct()[400]))
    y = torch.einsum("oc,nc...->no...", weight, x) + lin.bias.view(1, -1, *([1] * (len(shape) - 2)))
    expected = (y - running_mean.view(view)) / torch.sqrt(running_var.view(view) + bn.eps) * bn.weight.view(view) \
        + bn.bias.view(view)
    # (the scheduler's abar is float32: a relative 1e-7 in the scale, which training-mode BN removes)
    assert torch.allclose(denoised, expected, rtol=1e-6, atol=1e-6), (denoised - expected).abs().max()


def test_autoencoder_loss_and_latent_target():
    torch.manual_seed(4)
    module = DiffKD(6, 16, ae_channels=4)
    teacher = torch.randn(3, 16, 2, 2)
    out = module(torch.randn(3, 6, 2, 2), teacher)
    # Direct: conv 1x1, batch-norm with batch statistics, conv 1x1 back.
    conv, bn = module.autoencoder.encoder[0], module.autoencoder.encoder[1]
    y = torch.einsum("oc,nchw->nohw", conv.weight[:, :, 0, 0], teacher) + conv.bias.view(1, -1, 1, 1)
    mean, var = y.mean(dim=(0, 2, 3), keepdim=True), y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    latent = (y - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    dec = module.autoencoder.decoder
    recon = torch.einsum("oc,nchw->nohw", dec.weight[:, :, 0, 0], latent) + dec.bias.view(1, -1, 1, 1)
    assert torch.allclose(out.losses["ae"], ((recon - teacher) ** 2).mean(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(out.target, latent, rtol=1e-4, atol=1e-5)
    assert not out.target.requires_grad and out.denoised.shape == (3, 4, 2, 2)
    assert torch.allclose(out.losses["kd"], F.mse_loss(out.denoised, latent), rtol=1e-4, atol=1e-6)

    # The KD and diffusion losses do not train the encoder (the latent is detached); L_ae does.
    (out.losses["kd"] + out.losses["diff"]).backward(retain_graph=True)
    assert conv.weight.grad is None
    module.student_proj.weight.grad = None
    out.losses["ae"].backward()
    assert conv.weight.grad.abs().sum() > 0 and dec.weight.grad.abs().sum() > 0
    assert module.student_proj.weight.grad is None


def test_gradient_reaches_student_and_backbone_not_teacher():
    torch.manual_seed(5)
    backbone = nn.Conv2d(3, 6, 3, padding=1)  # stand-in student backbone
    module = DiffKD(6, 8)
    images = torch.randn(2, 3, 4, 4)
    teacher = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = module(backbone(images), teacher)
    assert out.denoised.shape == teacher.shape
    out.losses["diff"].backward(retain_graph=True)
    # L_diff trains the denoiser only, on the teacher feature.
    assert module.denoiser.time_embedding.weight.grad.abs().sum() > 0
    assert backbone.weight.grad is None and module.student_proj.weight.grad is None
    out.losses["kd"].backward()
    for p in (backbone.weight, module.student_proj.weight, module.out_proj[0].weight, module.out_proj[1].weight,
              module.noise_adapter.pred.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert teacher.grad is None


def test_logit_variant():
    torch.manual_seed(6)
    module = DiffKD(10, 7, kind="logits")
    assert isinstance(module.denoiser.net[0], nn.Linear) and module.autoencoder is None
    student = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 7)
    out = module(student, teacher)
    assert out.denoised.shape == (4, 7) and out.gamma.shape == (4,)
    log_ps, log_pt = out.denoised.log_softmax(1), teacher.log_softmax(1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()  # KL(p_t || p_s), T = 1, mean over rows
    assert torch.allclose(out.losses["kd"], kl, rtol=1e-5, atol=1e-7)
    assert float(out.losses["ae"]) == 0.0
    out.losses["kd"].backward()
    assert student.grad.abs().sum() > 0

    same = DiffKD(7, 7, kind="logits", project_student=False, kd_loss="mse")
    assert isinstance(same.student_proj, nn.Identity)
    out = same(torch.randn(4, 7), teacher)
    assert torch.allclose(out.losses["kd"], F.mse_loss(out.denoised, teacher))


def test_determinism_and_resume_from_rng_state():
    def run(module, s, t, generator=None):
        out = module(s, t, generator=generator)
        return out.denoised.detach(), torch.stack([v.detach() for v in out.losses.values()])

    torch.manual_seed(8)
    s, t = torch.randn(2, 6, 3, 3), torch.randn(2, 8, 3, 3)
    torch.manual_seed(9)
    a = DiffKD(6, 8)
    torch.manual_seed(9)
    b = DiffKD(6, 8)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    # Global RNG: a saved and restored torch RNG state replays the same noise bit for bit.
    state = torch.get_rng_state()
    first = run(a, s, t)
    torch.set_rng_state(state)
    second = run(b, s, t)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    third = run(b, s, t)  # the stream moved on: new noise
    assert not torch.equal(first[0], third[0])

    # An explicit generator gives the same draws as the global RNG with the same seed.
    torch.manual_seed(9)
    c = DiffKD(6, 8)
    torch.manual_seed(9)
    d = DiffKD(6, 8)
    torch.manual_seed(11)
    global_rng = run(c, s, t)
    with_generator = run(d, s, t, generator=torch.Generator().manual_seed(11))
    assert torch.equal(global_rng[0], with_generator[0]) and torch.equal(global_rng[1], with_generator[1])


def test_state_dict_prefix_and_total():
    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Conv2d(3, 6, 1)
            self.diffkd = DiffKD(6, 8, ae_channels=4)

    state = Student().state_dict()
    assert any(k.startswith(DIFFKD_PREFIX) for k in state)
    assert not any("scheduler" in k for k in state)  # the scheduler holds no state
    kept = drop_diffkd_keys(state)
    assert sorted(kept) == ["backbone.bias", "backbone.weight"]

    losses = {"diff": torch.tensor(1.5), "ae": torch.tensor(0.25), "kd": torch.tensor(2.0)}
    assert DIFFKD_LOSS_WEIGHTS == {"diff": 1.0, "ae": 1.0, "kd": 1.0}
    assert float(diffkd_total(losses)) == pytest.approx(3.75)
    assert float(diffkd_total(losses, {"diff": 1.0, "ae": 1.0, "kd": 5.0})) == pytest.approx(11.75)
    with pytest.raises(ValueError, match="lack"):
        diffkd_total(losses, {"diff": 1.0})


def test_bad_input():
    with pytest.raises(ValueError, match="kind"):
        DiffKD(4, 4, kind="tokens")
    with pytest.raises(ValueError, match="ae_channels"):
        DiffKD(4, 4, kind="logits", ae_channels=2)
    with pytest.raises(ValueError, match="kl"):
        DiffKD(4, 4, kd_loss="kl")
    with pytest.raises(ValueError, match="inference_steps"):
        DiffKD(4, 4, inference_steps=600)
    with pytest.raises(ValueError, match="project_student"):
        DiffKD(4, 5, kind="logits", project_student=False)
    module = DiffKD(4, 6)
    with pytest.raises(ValueError, match="N, C, H, W"):
        module(torch.randn(2, 4), torch.randn(2, 6))
    with pytest.raises(ValueError, match="agree"):
        module(torch.randn(2, 4, 3, 3), torch.randn(2, 6, 4, 4))
    with pytest.raises(ValueError, match="teacher has 5 channels"):
        module(torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3))
