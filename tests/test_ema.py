"""EMA of the weights: EDM2's power-function EMA and the half-life EMA (scm_fast/ema.py)."""
import io
import math

import numpy as np
import pytest
import torch

from scm_fast.ema import (SIGMA_REL_MAX, HalfLifeEMA, PowerEMA, make_ema, power_function_gamma,
                          sigma_rel_of_gamma)


def _weights(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 5, generator=g).to(dtype), "b": torch.randn(7, generator=g).to(dtype),
            "count": torch.tensor(seed, dtype=torch.int64)}


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------- gamma <-> sigma_rel [EDM2 Eq. 3]

@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.10, 0.2, 0.28])
def test_gamma_inverts_sigma_rel(sigma_rel):
    gamma = power_function_gamma(sigma_rel)
    assert gamma > 0
    assert sigma_rel_of_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-12)


def test_edm2_pair_is_005_to_16_97_and_010_to_6_94():
    # EDM2's two exponents, each checked against the closed form sigma_rel(gamma) rather than trusted:
    assert sigma_rel_of_gamma(16.97) == pytest.approx(0.05, abs=5e-5)
    assert sigma_rel_of_gamma(6.94) == pytest.approx(0.10, abs=5e-5)
    assert power_function_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert power_function_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    # the swapped pairing is wrong: a narrower average (smaller sigma_rel) needs a larger gamma
    assert abs(sigma_rel_of_gamma(6.94) - 0.05) > 0.04


def test_gamma_bound_is_one_over_sqrt12():
    assert SIGMA_REL_MAX == pytest.approx(1 / math.sqrt(12))
    assert sigma_rel_of_gamma(0.0) == pytest.approx(SIGMA_REL_MAX)
    assert 0 < power_function_gamma(SIGMA_REL_MAX * (1 - 1e-6)) < 1e-4
    for bad in (0.0, -0.1, SIGMA_REL_MAX, 0.3):
        with pytest.raises(ValueError, match=r"0 < sigma_rel < 1/sqrt\(12\) = 0.288675"):
            power_function_gamma(bad)


# ---------------------------------------------------------------- PowerEMA

def test_power_names_and_dtypes():
    ema = PowerEMA(_weights(dtype=torch.bfloat16))
    assert ema.names == ["power-0.050", "power-0.100"]
    avg = ema.averaged("power-0.050")
    assert avg["w"].dtype == torch.float32 and avg["count"].dtype == torch.int64
    with pytest.raises(KeyError, match="unknown average 'power-0.2'.*power-0.050"):
        ema.averaged("power-0.2")


def test_power_step1_copies_and_nonfloat_copied():
    ema = PowerEMA(_weights(0))
    new = _weights(1, dtype=torch.bfloat16)
    ema.update(new, cur_nimg=64, batch_images=64)
    for name in ema.names:
        avg = ema.averaged(name)
        assert torch.equal(avg["w"], new["w"].float()) and torch.equal(avg["b"], new["b"].float())
        assert avg["count"].item() == 1


def test_power_constant_stays_constant():
    w = _weights(3)
    ema = PowerEMA(_weights(0))
    for step in range(1, 200):
        ema.update(w, cur_nimg=64 * step, batch_images=64)
    for name in ema.names:
        assert torch.equal(ema.averaged(name)["w"], w["w"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_power_linear_weight_matches_closed_form(dtype):
    # w_t = t. ema_T = sum_t w_t (t^(g+1) - (t-1)^(g+1)) / T^(g+1)  [EDM2 Eq. 4 unrolled]
    #               = T - sum_{t<T} (t/T)^(g+1)                       (summation by parts)
    T = 1000
    ema = PowerEMA({"w": torch.zeros(4, dtype=dtype)})
    for t in range(1, T + 1):
        ema.update({"w": torch.full((4,), float(t), dtype=dtype)}, cur_nimg=32 * t, batch_images=32)
    for name, gamma in zip(ema.names, ema.gammas):
        damping = (np.arange(1, T, dtype=np.float64) / T) ** (gamma + 1)
        expected = T - damping.sum()
        got = ema.averaged(name)["w"].double()
        if dtype == torch.float64:
            tol = 1e-6
        else:  # fp32 storage: <= 2 roundings of 2^-24 per step, damped by (t/T)^(g+1) afterwards
            tol = 2 * 2.0 ** -24 * (1 + damping.sum()) * T / expected
        assert torch.all((got - expected).abs() <= tol * expected), (name, got[0].item(), expected, tol)


def test_power_update_validates():
    ema = PowerEMA(_weights())
    with pytest.raises(ValueError, match="cur_nimg must count images seen so far including this batch"):
        ema.update(_weights(), cur_nimg=0, batch_images=64)
    with pytest.raises(ValueError, match="batch_images must be > 0"):
        ema.update(_weights(), cur_nimg=64, batch_images=0)
    bad = _weights()
    del bad["b"]
    bad["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['b'\]; unexpected \['extra'\]"):
        ema.update(bad, 64, 64)
    bad = _weights()
    bad["w"] = torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r"w: expected shape \(3, 5\), got \(5, 3\)"):
        ema.update(bad, 64, 64)
    with pytest.raises(ValueError, match="sigma_rel must satisfy"):
        PowerEMA(_weights(), sigma_rels=(0.05, 0.5))


# ---------------------------------------------------------------- HalfLifeEMA

def test_halflife_start_weight_is_half_after_one_half_life():
    w0 = {"w": torch.zeros(6)}
    ema = HalfLifeEMA(w0, half_life_kimg=1.0)   # 1000 images
    assert ema.names == ["halflife-1k"]
    ones = {"w": torch.ones(6)}
    for i in range(1, 11):                       # 10 batches of 100 images
        ema.update(ones, cur_nimg=100 * i, batch_images=100)
    # ema = 0.5 * w0 + 0.5 * 1
    assert torch.allclose(ema.averaged("halflife-1k")["w"], torch.full((6,), 0.5), rtol=0, atol=1e-6)


def test_halflife_rampup():
    ema = HalfLifeEMA({"w": torch.zeros(2)}, half_life_kimg=500.0, rampup_ratio=0.5)
    assert ema.names == ["halflife-500k"]
    assert ema.beta(cur_nimg=1000, batch_images=100) == pytest.approx(0.5 ** (100 / 500))
    assert ema.beta(cur_nimg=10 ** 7, batch_images=100) == pytest.approx(0.5 ** (100 / 500_000))
    ema.update({"w": torch.ones(2)}, cur_nimg=100, batch_images=100)   # h = 50 images: beta = 0.25
    assert torch.allclose(ema.averaged(ema.names[0])["w"], torch.full((2,), 0.75))
    with pytest.raises(ValueError, match="cur_nimg must count images seen so far including this batch"):
        ema.update({"w": torch.ones(2)}, cur_nimg=0, batch_images=100)


# ---------------------------------------------------------------- state_dict, factory

def _run(ema, start, stop):
    for step in range(start, stop):
        w = _weights(step)
        ema.update(w, cur_nimg=64 * step, batch_images=64)


@pytest.mark.parametrize("kind", ["power", "halflife"])
def test_state_dict_roundtrip_continues_bit_for_bit(kind):
    kwargs = dict(half_life_kimg=0.5, rampup_ratio=0.05)
    ref = make_ema(kind, _weights(0), **kwargs)
    _run(ref, 1, 30)
    state = _roundtrip(ref.state_dict())
    resumed = make_ema(kind, _weights(99), **kwargs)
    resumed.load_state_dict(state)
    _run(ref, 30, 60)
    _run(resumed, 30, 60)
    for name in ref.names:
        a, b = ref.averaged(name), resumed.averaged(name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert ref.state_dict()["counters"] == resumed.state_dict()["counters"]


def test_load_state_dict_errors():
    ema = PowerEMA(_weights())
    good = _roundtrip(ema.state_dict())
    state = _roundtrip(ema.state_dict())
    del state["averages"]["power-0.050"]["b"]
    state["averages"]["power-0.050"]["bogus"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"average 'power-0.050': missing \['b'\]; unexpected \['bogus'\]"):
        ema.load_state_dict(state)
    state = _roundtrip(good)
    state["averages"]["power-0.100"]["w"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"shape mismatch: w: expected shape \(3, 5\), got \(2, 2\)"):
        ema.load_state_dict(state)
    other = PowerEMA(_weights(), sigma_rels=(0.05,))
    with pytest.raises(ValueError, match="config"):
        other.load_state_dict(good)
    with pytest.raises(ValueError, match=r"kind='power'.*kind='halflife'"):
        HalfLifeEMA(_weights()).load_state_dict(good)
    with pytest.raises(ValueError, match=r"missing \['counters'\]"):
        ema.load_state_dict({k: v for k, v in good.items() if k != "counters"})


def test_make_ema_and_to():
    assert make_ema("none", _weights()) is None
    assert isinstance(make_ema("power", _weights(), sigma_rels=(0.1,)), PowerEMA)
    ema = make_ema("halflife", _weights(), half_life_kimg=2.5)
    assert ema.names == ["halflife-2.5k"] and ema.to("cpu") is ema
    with pytest.raises(ValueError, match="kind must be one of 'power', 'halflife', 'none', got 'karras'"):
        make_ema("karras", _weights())
    with pytest.raises(TypeError, match="non-empty dict"):
        make_ema("power", [])
