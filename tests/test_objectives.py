"""TrigFlow and the sCM objectives on a distribution with a known answer (tests/gmm.py)."""
import math

import pytest
import torch

import gmm
from scm_fast import objectives, trigflow
from scm_fast.models.dit import positional


class MLP(torch.nn.Module):
    """A small F(x_in, t) for 2-D data: [x_in, positional(t)] -> 3 x SiLU(128) -> 2."""

    def __init__(self, width=128, freq_dim=32):
        super().__init__()
        self.freq_dim = freq_dim
        self.net = torch.nn.Sequential(torch.nn.Linear(2 + freq_dim, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, 2))

    def forward(self, x_in, t):
        return self.net(torch.cat([x_in, positional(t, self.freq_dim, max_period=100.0).to(x_in)], dim=1))


def test_trigflow_identities():
    g = torch.Generator().manual_seed(0)
    x0, z = gmm.sample(64, g), gmm.SIGMA_D * torch.randn(64, 2, generator=g)
    t = trigflow.sample_time(64, -1.0, 1.4, generator=g)
    assert ((t > 0) & (t < math.pi / 2)).all()
    x_t = trigflow.noisy(x0, z, t)
    v = trigflow.target_velocity(x0, z, t)
    # the true velocity as F recovers x0 exactly: f = cos t x_t - sin t sigma_d (v / sigma_d) = x0
    torch.testing.assert_close(trigflow.denoise(v / gmm.SIGMA_D, x_t, t), x0)
    # d x_t / dt by central differences
    h = 1e-3
    fd = (trigflow.noisy(x0.double(), z.double(), t.double() + h) - trigflow.noisy(x0.double(), z.double(), t.double() - h)) / (2 * h)
    torch.testing.assert_close(v.double(), fd, atol=1e-5, rtol=1e-5)


def test_edm_converter_inverts_the_trigflow_denoiser():
    """from_edm(D) with D the ideal EDM denoiser of the mixture gives back the ideal TrigFlow F."""
    def edm_denoiser(x_sigma, sigma):
        t = torch.atan(sigma / gmm.SIGMA_D)
        x_t = torch.cos(t)[:, None] * x_sigma
        F = gmm.ideal_F(x_t / gmm.SIGMA_D, t)
        return trigflow.denoise(F, x_t, t, gmm.SIGMA_D)

    F = trigflow.from_edm(edm_denoiser)
    x_in, t = torch.randn(32, 2, dtype=torch.float64), torch.rand(32, dtype=torch.float64) * 1.4 + 0.1
    torch.testing.assert_close(F(x_in, t), gmm.ideal_F(x_in, t))


def test_ode_sampler_with_the_ideal_teacher_reaches_the_data():
    """The PF-ODE of the exact denoiser transports noise to the mixture (both solvers, NFE 35): its
    samples are within 3x the distance between two independent data samples (noise: 10x)."""
    g = torch.Generator().manual_seed(1)
    noise, target = torch.randn(2000, 2, generator=g, dtype=torch.float64), gmm.sample(2000, g, torch.float64)
    baseline = gmm.sliced_wasserstein(gmm.sample(2000, g, torch.float64), target)
    assert gmm.sliced_wasserstein(gmm.SIGMA_D * noise, target) > 10 * baseline
    for solver in ("heun", "dpm2"):
        x = trigflow.ode_sample(gmm.ideal_F, noise, steps=18, solver=solver)
        assert gmm.sliced_wasserstein(x, target) < 3 * baseline, solver


def train(objective, steps, seed=0, lr=2e-3, batch=512, **kw):
    torch.manual_seed(seed)
    F = MLP()
    opt = torch.optim.Adam(F.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        loss, _ = objective(F, gmm.sample(batch, g), step, generator=g, **kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return F, losses


def scm(F, x0, step, generator, cfg, teacher=None):
    return objectives.scm_loss(F, x0, step, cfg, teacher=teacher, generator=generator)


@pytest.mark.parametrize("mode", ["sCD", "sCT"])
def test_consistency_training_learns_the_mixture(mode):
    """sCD (exact teacher) and sCT (from scratch): the loss falls and 1-step samples land near the
    mixture: sliced W1 to the data below 30% of the untrained model's."""
    cfg = objectives.SCMConfig(sigma_d=gmm.SIGMA_D, tangent_warmup=200)
    teacher = gmm.ideal_F if mode == "sCD" else None
    F, losses = train(scm, 800, cfg=cfg, teacher=teacher)
    g = torch.Generator().manual_seed(5)
    noise, target = torch.randn(4000, 2, generator=g), gmm.sample(4000, g)
    untrained = gmm.sliced_wasserstein(trigflow.consistency_sample(MLP(), noise), target)
    trained = gmm.sliced_wasserstein(trigflow.consistency_sample(F, noise), target)
    assert sum(losses[-100:]) < sum(losses[:100]), (losses[:5], losses[-5:])
    assert trained < 0.3 * untrained, (trained, untrained)


def test_one_pass_and_two_pass_give_the_same_gradients():
    grads = []
    for one_pass in (True, False):
        torch.manual_seed(0)
        F = MLP().double()
        cfg = objectives.SCMConfig(sigma_d=gmm.SIGMA_D, one_pass=one_pass)
        loss, _ = objectives.scm_loss(F, gmm.sample(64, torch.Generator().manual_seed(1), torch.float64), 500, cfg,
                                      generator=torch.Generator().manual_seed(2))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in F.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_rearranged_jvp_equals_naive_in_fp64():
    """The rearrangement is exact algebra: same loss in fp64 as the naive tangent."""
    losses = []
    for rearranged in (True, False):
        torch.manual_seed(0)
        F = MLP().double()
        cfg = objectives.SCMConfig(sigma_d=gmm.SIGMA_D, rearranged_jvp=rearranged)
        loss, _ = objectives.scm_loss(F, gmm.sample(64, torch.Generator().manual_seed(1), torch.float64), 500, cfg,
                                      generator=torch.Generator().manual_seed(2))
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-12)


class EDMStyleNet(torch.nn.Module):
    """F(x_in, t) conditioned the way many EDM-era networks are: c_noise = log(sigma_d tan t) / 4
    (EDM's log(sigma) / 4) through Fourier features of scale 16. dc/dt = 1 / (4 sin t cos t) is
    ~2500 at both ends of [1e-4, pi/2 - 1e-4], and the Fourier features multiply it by 2 pi f.
    The time features are computed in fp32 (as scm_fast's models do [rCM]; t itself cannot be
    held in fp16 near pi/2), the rest in the weights' dtype."""

    def __init__(self, width=64, n_freq=16, scale=16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(n_freq, generator=torch.Generator().manual_seed(3)) * scale)
        self.time = torch.nn.Linear(2 * n_freq, width)
        self.inp = torch.nn.Linear(2, width)
        self.out = torch.nn.Linear(width, 2)

    def forward(self, x_in, t):
        tt = t.float() if t.dtype != torch.float64 else t
        c = torch.log(gmm.SIGMA_D * torch.tan(tt)) / 4
        arg = 2 * math.pi * c[:, None] * self.freqs[None].to(tt)
        feats = torch.cat([arg.cos(), arg.sin()], dim=1).to(self.time.weight.dtype)
        h = torch.nn.functional.silu(self.inp(x_in.to(feats.dtype)) + self.time(feats))
        return self.out(h)


def test_rearranged_jvp_stays_finite_in_fp16_where_the_naive_tangent_overflows(monkeypatch):
    """[P §4.2] In fp16 the naive tangent (dxdt / sigma_d, 1) makes dF/dt overflow (> 65504) near
    t = 0 and t = pi/2; the rearranged tangent (cos t sin t dxdt, cos t sin t sigma_d) keeps every
    intermediate tangent small. Both run through scm_loss on t in [1e-4, pi/2 - 1e-4]; the fp16
    rearranged g matches the fp64 one."""
    t_grid = torch.cat([torch.tensor([1e-4, 1e-3]), torch.linspace(0.05, math.pi / 2 - 0.05, 12),
                        torch.tensor([math.pi / 2 - 1e-3, math.pi / 2 - 1e-4])]).double()
    monkeypatch.setattr(objectives.trigflow, "sample_time", lambda n, *a, **k: t_grid[:n].to(a[-1] if a else None))
    torch.manual_seed(0)
    net = EDMStyleNet()
    nets = {torch.float16: EDMStyleNet().half(), torch.float64: EDMStyleNet().double()}
    nets[torch.float16].freqs.data = nets[torch.float16].freqs.float()  # a constant of the fp32 time path
    for n in nets.values():
        n.load_state_dict(net.state_dict())
    x0 = gmm.sample(len(t_grid), torch.Generator().manual_seed(1), torch.float64)

    def run(dtype, rearranged):
        F = lambda x_in, t: nets[dtype](x_in, t)  # noqa: E731
        cfg = objectives.SCMConfig(sigma_d=gmm.SIGMA_D, rearranged_jvp=rearranged, tangent_warmup=0)
        with torch.no_grad():  # the tangent needs no graph; loss stats only (same fp64 data and noise)
            _, stats = objectives.scm_loss(F, x0, 0, cfg, generator=torch.Generator().manual_seed(2))
        return stats

    exact = run(torch.float64, True)
    rearranged, naive = run(torch.float16, True), run(torch.float16, False)
    assert int(naive["nonfinite_tangent"]) > 0  # the naive fp16 tangent overflows ...
    assert not torch.isfinite(naive["g_norm"][[0, 1, -2, -1]]).all()  # ... at the ends of the interval
    assert int(rearranged["nonfinite_tangent"]) == 0 and torch.isfinite(rearranged["g_norm"]).all()
    rel = (rearranged["g_norm"].double() - exact["g_norm"]).abs() / exact["g_norm"]
    assert rel.max() < 2e-2, rel  # fp16 rounding (2^-11 per op) over a few dozen ops


def test_tangent_normalisation():
    g = torch.randn(4, 3, 5, dtype=torch.float64)
    l2 = objectives.normalize_tangent(g, "l2", 0.1)
    torch.testing.assert_close(l2.flatten(1).norm(dim=1), g.flatten(1).norm(dim=1) / (g.flatten(1).norm(dim=1) + 0.1))
    rms = objectives.normalize_tangent(g, "rms", 0.0)
    torch.testing.assert_close(rms.flatten(1).square().mean(1), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="tangent_norm must be"):
        objectives.SCMConfig(tangent_norm="max")


def test_diffusion_loss_of_the_ideal_network_is_its_floor():
    """The exact F* has a lower diffusion loss than a perturbed one (the loss is minimised at F*)."""
    x0 = gmm.sample(4096, torch.Generator().manual_seed(3), torch.float64)
    kw = dict(sigma_d=gmm.SIGMA_D, P_mean=-0.8, P_std=1.6)
    best, _ = objectives.diffusion_loss(gmm.ideal_F, x0, generator=torch.Generator().manual_seed(4), **kw)
    worse, _ = objectives.diffusion_loss(lambda x, t: 1.05 * gmm.ideal_F(x, t), x0,
                                         generator=torch.Generator().manual_seed(4), **kw)
    assert best < worse


def test_meanflow_loss_trains():
    class U(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = MLP()
            self.r = torch.nn.Linear(32, 2 + 32, bias=False)

        def forward(self, z, r, t):
            return self.net(z + self.r(positional(r, 32, 100.0))[:, :2], t)

    torch.manual_seed(0)
    u = U()
    opt = torch.optim.Adam(u.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    errors = []  # the raw squared error: the adaptively weighted loss stays near 1 by design
    for _ in range(300):
        loss, stats = objectives.meanflow_loss(u, gmm.sample(256, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        errors.append(stats["err"].mean().item())
    assert sum(errors[-50:]) / 50 < 0.8 * sum(errors[:5]) / 5, (errors[:3], errors[-3:])


def test_label_dropout_replaces_the_given_fraction_with_the_null_class():
    seen = []

    def F(x_in, t, labels):
        seen.append(labels)
        return torch.zeros_like(x_in)

    labels = torch.arange(4000) % 3
    objectives.diffusion_loss(F, gmm.sample(4000), {"labels": labels}, label_dropout=0.1,
                              generator=torch.Generator().manual_seed(0))
    frac = (seen[0] == -1).float().mean().item()
    assert 0.08 < frac < 0.12 and torch.equal(seen[0][seen[0] >= 0], labels[seen[0] >= 0])


def test_scd_draws_one_guidance_scale_per_sample_for_teacher_and_student():
    """guidance_input: s ~ U[1, 2] reaches the CFG teacher (F_u + s (F_c - F_u)) and the student."""
    seen = {}

    def teacher_net(x_in, t, labels):
        return torch.where(labels[:, None] < 0, torch.zeros_like(x_in), torch.ones_like(x_in))  # F_u = 0, F_c = 1

    def student(x_in, t, labels, guidance):
        seen["student"] = guidance
        return x_in * 0.1

    teacher = trigflow.cfg(teacher_net)
    cfg = objectives.SCMConfig(sigma_d=gmm.SIGMA_D, guidance_input=True)
    labels = torch.tensor([0, 1, 2, 0])
    objectives.scm_loss(student, gmm.sample(4), 10, cfg, cond={"labels": labels},
                        teacher=lambda x, t, **c: seen.setdefault("teacher", teacher(x, t, **c)),
                        generator=torch.Generator().manual_seed(0))
    s = seen["student"]
    assert s.shape == (4,) and ((s >= 1) & (s <= 2)).all() and s.unique().numel() == 4
    torch.testing.assert_close(seen["teacher"], s[:, None].expand(4, 2))  # F_u + s (F_c - F_u) = s


# ---- the adaptive weight's start and the sampler's t_max follow the run's settings -----------------------
@pytest.mark.parametrize("objective, norm", [("diffusion", "l2"), ("sct", "l2"), ("sct", "rms"), ("sct", "none")])
def test_initial_logvar_is_where_the_weighted_loss_of_an_untrained_network_is_smallest(objective, norm):
    """An untrained network (F = 0) on data of std sigma_d: exp(initial_logvar) is the batch's mean
    squared error, so exp(-lv) e + lv is minimal at the head's first value."""
    sigma_d, D = 0.75, 64
    g = torch.Generator().manual_seed(0)
    x0 = sigma_d * torch.randn(8192, 1, 8, 8, generator=g, dtype=torch.float64)

    def F(x_in, t, **_):
        return 0.0 * x_in + 0.0 * t.reshape(-1, 1, 1, 1)

    if objective == "diffusion":
        _, st = objectives.diffusion_loss(F, x0, sigma_d=sigma_d, generator=g)
    else:
        cfg = objectives.SCMConfig(sigma_d=sigma_d, tangent_norm=norm, tangent_warmup=10_000)
        _, st = objectives.scm_loss(F, x0, 0, cfg, generator=g)
    expected = objectives.initial_logvar(objective, norm, D, sigma_d, -1.0 if objective == "sct" else -0.8,
                                         1.4 if objective == "sct" else 1.6)
    assert math.log(st["err"].mean().item()) == pytest.approx(expected, abs=0.05)
    if (objective, norm) == ("sct", "l2"):
        assert expected == pytest.approx(-math.log(D), abs=0.2)  # ||g|| >> c: about 1 / D


def test_adaptive_weight_starts_at_its_initial_logvar():
    from scm_fast.models import AdaptiveWeight
    w = AdaptiveWeight(init_logvar=-math.log(64))
    torch.testing.assert_close(w(torch.tensor([0.01, 0.7, 1.5])), torch.full((3,), -math.log(64)))


def test_t_max_follows_sigma_d():
    from scm_fast import sample
    for sigma_d in (0.5, 0.75, 1.0):
        assert trigflow.t_max(sigma_d) == math.atan(80.0 / sigma_d)  # sigma_max = 80 in data units [P §5.2]
        assert sample.consistency_times(1, sigma_d) == (trigflow.t_max(sigma_d),)
        assert sample.consistency_times(2, sigma_d, t_mid=0.9) == (trigflow.t_max(sigma_d), 0.9)
    assert trigflow.T_MAX == trigflow.t_max(0.5)
    seen = []

    def F(x_in, t):
        seen.append(t[0].item())
        return torch.zeros_like(x_in)
    trigflow.consistency_sample(F, torch.randn(2, 3), sigma_d=0.75)
    assert seen == [pytest.approx(math.atan(80 / 0.75))]
