"""Tests for scm_fast.eval: the digits classifier, FD, precision/recall, TorchScript extractors, the CLI."""
import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch

from scm_fast import eval as E


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """One classifier cache for the whole module (trained once, a few seconds)."""
    return tmp_path_factory.mktemp("scm_fast_cache")


@pytest.fixture(autouse=True)
def cache(cache_root, monkeypatch):
    monkeypatch.setenv("SCM_FAST_CACHE", str(cache_root))
    return cache_root


@pytest.fixture(scope="module")
def digits():
    return E.load_digits_images()


@pytest.fixture
def digits_feats(digits):
    return E.digits_features(digits[0])


# ---- classifier ------------------------------------------------------------------------------------
def test_classifier_heldout_accuracy(digits, cache):
    model = E.digits_classifier()
    assert not model.training
    x, y = digits
    _, test_idx = E.digits_split(len(x))
    with torch.no_grad():
        acc = (model(x[test_idx]).argmax(1) == y[test_idx]).double().mean().item()
    assert acc >= 0.97
    assert model.heldout_accuracy == pytest.approx(acc)
    path = E.classifier_path()
    assert os.path.dirname(path) == str(cache) and E.recipe_hash() in os.path.basename(path)
    assert os.path.isfile(path)
    assert [f for f in os.listdir(cache) if f.startswith(".tmp-")] == []   # atomic write left no temp file
    assert E.digits_classifier().heldout_accuracy == pytest.approx(acc)     # reloaded from the cache


def test_features_deterministic_across_fresh_trainings(digits, tmp_path, monkeypatch):
    x = digits[0][:300]
    first = E.digits_features(x)                      # the module's cache
    monkeypatch.setenv("SCM_FAST_CACHE", str(tmp_path / "fresh"))
    assert not os.path.exists(E.classifier_path())
    second = E.digits_features(x)                     # trains again from scratch
    assert os.path.isfile(E.classifier_path())
    assert first.dtype == np.float64 and first.shape == (300, E.FEATURE_DIM)
    assert np.array_equal(first, second)


def test_recipe_change_changes_cache_file(monkeypatch):
    before = E.classifier_path()
    monkeypatch.setitem(E.RECIPE, "epochs", E.RECIPE["epochs"] + 1)
    assert E.classifier_path() != before


def test_corrupt_cache_is_retrained(tmp_path, monkeypatch, digits):
    monkeypatch.setenv("SCM_FAST_CACHE", str(tmp_path))
    path = E.classifier_path()
    os.makedirs(tmp_path, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"not a safetensors file")
    model = E.digits_classifier()
    assert model.heldout_accuracy >= 0.97


def test_digits_features_channels_and_resize(digits):
    x = digits[0][:64]
    f1 = E.digits_features(x)
    assert np.allclose(E.digits_features(x.expand(-1, 3, -1, -1)), f1)
    big = torch.nn.functional.interpolate(x, size=(32, 32), mode="nearest")
    f_big = E.digits_features(big)
    assert f_big.shape == (64, E.FEATURE_DIM) and np.isfinite(f_big).all()
    uint8 = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)   # (N, H, W, C)
    assert np.allclose(E.digits_features(uint8.numpy()), f1, atol=0.05)       # up to 1/255 quantisation


def test_digits_features_rejects_bad_input():
    with pytest.raises(ValueError, match=r"images must be 4-d"):
        E.digits_features(torch.zeros(8, 8))
    with pytest.raises(ValueError, match=r"C in \(1, 3\), got shape \(2, 2, 8, 8\)"):
        E.digits_features(torch.zeros(2, 2, 8, 8))


# ---- Frechet distance ---------------------------------------------------------------------------------
def test_fd_halves_small_noise_large(digits):
    x = digits[0]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    a, b = E.digits_features(x[perm[:898]]), E.digits_features(x[perm[898:]])
    noise = torch.randn(898, 1, 8, 8, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    fd_halves = E.frechet_distance(*E.feature_stats(a), *E.feature_stats(b))
    fd_noise = E.frechet_distance(*E.feature_stats(a), *E.feature_stats(E.digits_features(noise)))
    assert 0 < fd_halves and fd_noise >= 20 * fd_halves


def _random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_identity_and_scipy():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(d, rng), _random_spd(d, rng)
    assert E.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert E.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-8)
    assert E.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(direct, rel=1e-8)


def test_frechet_distance_singular_covariance():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((10, 32))                       # fewer samples than dimensions: rank-deficient
    mu, sigma = E.feature_stats(f)
    assert E.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-8)
    mu2, sigma2 = E.feature_stats(rng.standard_normal((10, 32)) + 1)
    fd = E.frechet_distance(mu, sigma, mu2, sigma2)
    assert np.isfinite(fd) and fd > 0


def test_frechet_distance_shape_error():
    with pytest.raises(ValueError, match=r"expected mu1, mu2 of shape \(3,\)"):
        E.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="at least 2 rows"):
        E.feature_stats(np.zeros((1, 3)))


# ---- precision / recall -----------------------------------------------------------------------------------
def test_precision_recall_self_and_disjoint():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 8))
    assert E.precision_recall(a, a, k=3) == (1.0, 1.0)
    far = rng.standard_normal((150, 8)) + 100.0
    assert E.precision_recall(a, far, k=3) == (0.0, 0.0)


def test_precision_recall_mode_dropping(digits, digits_feats):
    _, y = digits
    fake = digits_feats[(y < 5).numpy()]
    precision, recall = E.precision_recall(digits_feats, fake, k=3)
    assert precision >= 0.95
    assert recall <= 0.7 and recall < precision - 0.3


def test_precision_recall_chunked_matches_unchunked(monkeypatch):
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((97, 5)), rng.standard_normal((61, 5)) + 0.5
    full = E.precision_recall(a, b, k=2)
    monkeypatch.setattr(E, "_chunk_rows", lambda n_cols: 7)
    assert E.precision_recall(a, b, k=2) == full


def test_precision_recall_errors():
    a = np.zeros((5, 3))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, min\(N_real, N_fake\) - 1\] = \[1, 4\], got 5"):
        E.precision_recall(a, a, k=5)
    with pytest.raises(ValueError, match="same width, got 3 and 4"):
        E.precision_recall(a, np.zeros((5, 4)))


# ---- evaluate ---------------------------------------------------------------------------------------------------
def test_evaluate_digits(digits):
    x, _ = digits
    subset = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:400]]
    res = E.evaluate(subset)
    assert set(res) == {"fd", "precision", "recall", "n", "features"}
    assert res["n"] == 400 and res["features"] == "classifier"
    assert res["precision"] >= 0.9 and 0 < res["recall"] <= 1
    noise = E.evaluate(torch.rand(400, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert 0 <= res["fd"] and noise["fd"] >= 10 * res["fd"] and noise["precision"] < 0.1


def test_evaluate_errors(digits):
    x = digits[0][:20]
    with pytest.raises(ValueError, match="features must be 'classifier', 'inception:PATH' or 'dinov2:PATH'"):
        E.evaluate(x, features="clip")
    with pytest.raises(ValueError, match="needs reference images .* or ref_stats"):
        E.evaluate(x, features="inception:/nowhere/inception.pt")


# ---- reference stats ------------------------------------------------------------------------------------------
def test_reference_stats(tmp_path):
    good = tmp_path / "ref.npz"
    np.savez(good, mu=np.zeros(4), sigma=np.eye(4))
    mu, sigma = E.reference_stats(str(good))
    assert mu.shape == (4,) and sigma.shape == (4, 4)
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(4))
    with pytest.raises(KeyError, match=r"lacks key\(s\) \['sigma'\]"):
        E.reference_stats(str(bad))
    with pytest.raises(FileNotFoundError, match="reference stats file not found"):
        E.reference_stats(str(tmp_path / "none.npz"))


# ---- TorchScript extractors ------------------------------------------------------------------------------------
class FakeInception(torch.nn.Module):
    """Mimics NVlabs' detector: uint8 NCHW RGB in, (N, 48) features with return_features=True."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        f = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)
        return f if return_features else f[:, :10]


class PlainModel(torch.nn.Module):
    """No return_features keyword: the extractor must fall back to model(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.float(), 2).flatten(1)


class FakeDino(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (224, 224) and x.dtype == torch.float32
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def _script(module, path):
    torch.jit.script(module).save(str(path))
    return str(path)


def test_torchscript_missing_path(tmp_path):
    path = str(tmp_path / "inception-2015-12-05.pt")
    with pytest.raises(FileNotFoundError, match=r"inception weights not found at .*inception-2015-12-05.pt: scm_fast "
                                                 r"never downloads weights; pass a local TorchScript file \(e.g. "):
        E.torchscript_features(path, torch.zeros(2, 3, 8, 8), "inception")
    with pytest.raises(FileNotFoundError, match="dinov2 weights not found"):
        E.torchscript_features(path, torch.zeros(2, 3, 8, 8), "dinov2")
    with pytest.raises(ValueError, match="kind must be one of"):
        E.torchscript_features(path, torch.zeros(2, 3, 8, 8), "clip")


def test_torchscript_inception_and_fallback(tmp_path, digits):
    x = digits[0][:10]                                           # grayscale: repeated to RGB
    f = E.torchscript_features(_script(FakeInception(), tmp_path / "inc.pt"), x, "inception", batch=4)
    assert f.shape == (10, 48) and f.dtype == np.float64
    u8 = ((x + 1) * 127.5).round().clamp(0, 255)
    expected = torch.nn.functional.adaptive_avg_pool2d(u8 / 255, 4).flatten(1).repeat(1, 3)
    assert np.allclose(f, expected.double().numpy(), atol=1e-6)
    g = E.torchscript_features(_script(PlainModel(), tmp_path / "plain.pt"), x, "inception")
    assert g.shape == (10, 12)


def test_torchscript_dinov2_and_evaluate(tmp_path, digits):
    x = digits[0][:40]
    path = _script(FakeDino(), tmp_path / "dino.pt")
    f = E.torchscript_features(path, x, "dinov2")
    assert f.shape == (40, 12) and np.isfinite(f).all()
    res = E.evaluate(x[:20], reference=x[20:], features=f"dinov2:{path}", k=3)
    assert res["precision"] is not None and res["features"] == f"dinov2:{path}"
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    res = E.evaluate(x[:20], features=f"dinov2:{path}", ref_stats=str(stats))
    assert res["precision"] is None and res["recall"] is None and res["fd"] >= 0


# ---- CLI ------------------------------------------------------------------------------------------------------------
def test_cli(tmp_path, digits, capsys):
    x = digits[0][:300]
    samples = tmp_path / "samples.npz"
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()   # (N, H, W, C)
    np.savez(samples, images=u8, labels=digits[1][:300].numpy())
    out = tmp_path / "res.json"
    res = E.main(["--samples", str(samples), "--json", str(out)])
    line = capsys.readouterr().out.strip()
    assert line.startswith("FD ") and "precision " in line and "recall " in line
    assert line.endswith("(n=300, features=classifier, reference=digits)")
    saved = json.loads(out.read_text())
    assert saved["fd"] == pytest.approx(res["fd"]) and saved["n"] == 300


def test_cli_missing_files(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        E.main(["--samples", str(tmp_path / "missing.npz")])
    assert e.value.code == 2
    assert "--samples: file not found" in capsys.readouterr().err
    samples = tmp_path / "s.npz"
    np.savez(samples, images=np.zeros((4, 8, 8, 1), np.uint8))
    with pytest.raises(SystemExit) as e:
        E.main(["--samples", str(samples), "--features", f"inception:{tmp_path / 'inc.pt'}"])
    assert e.value.code == 2
    assert "--features: inception weights not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        E.main(["--samples", str(samples), "--ref-stats", str(tmp_path / "ref.npz")])
    assert e.value.code == 2 and "--ref-stats: file not found" in capsys.readouterr().err
