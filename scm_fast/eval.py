"""Sample-quality metrics: Frechet distance and improved precision/recall in a feature space.

    FD = ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))          (Heusel et al. 2017)
    precision = |{g : exists r, ||g - r|| <= rho_k(r)}| / N_g                (Kynkaenniemi et al. 2019)
    recall    = |{r : exists g, ||r - g|| <= rho_k(g)}| / N_r
    rho_k(x)  = distance from x to its k-th nearest neighbour in its own set (x itself excluded)

Feature spaces:
- "classifier": a small CNN trained here, deterministically on CPU in a few seconds, on scikit-learn's
  digits (1797 images 8x8, the data the embedded trainer uses); its 128-d penultimate layer. Trained on
  a seeded 80% split; held-out accuracy on the other 20% is 0.9944 (357 of 359; stored in the cache
  file's metadata and as `model.heldout_accuracy`). Cached as safetensors under $SCM_FAST_CACHE or
  ~/.cache/scm_fast, the file name carrying a hash of the recipe.
- "inception:PATH": a local TorchScript Inception-v3 (NVlabs' inception-2015-12-05.pt), 2048-d pool features.
- "dinov2:PATH": a local TorchScript DINOv2 the user exported, its (N, D) output.
Nothing is ever downloaded.

Images are float (N, C, H, W) in [-1, 1]; sample files are .npz with 'images' uint8 (N, H, W, C).
CLI: python -m scm_fast.eval --samples S.npz [--ref digits|R.npz] [--features ...] [--ref-stats R.npz]
"""
import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---- the digits classifier ---------------------------------------------------------------------
RECIPE = {
    "arch": "conv1-32-3x3/gelu/conv32-64-3x3s2/gelu/fc1024-128/gelu/fc128-10",
    "data": "sklearn.load_digits x/8-1",
    "split_seed": 0, "train_fraction": 0.8,
    "seed": 0, "epochs": 30, "batch": 64, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-2,
    "schedule": "onecycle", "augment": "shift+-1px",
}
FEATURE_DIM = 128


class DigitsClassifier(nn.Module):
    """8x8 grayscale digit classifier; `features(x)` is the 128-d layer after its GELU."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)
        self.heldout_accuracy = None

    def features(self, x):
        """x (N, 1, 8, 8) in [-1, 1] -> (N, 128)."""
        h = F.gelu(self.conv1(x))
        h = F.gelu(self.conv2(h))                       # (N, 64, 4, 4)
        return F.gelu(self.fc(h.flatten(1)))

    def forward(self, x):
        """Logits (N, 10)."""
        return self.head(self.features(x))


def load_digits_images():
    """All of scikit-learn's digits: images float32 (1797, 1, 8, 8) in [-1, 1], labels int64 (1797,)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8 - 1
    return x, torch.tensor(d.target, dtype=torch.int64)


def digits_split(n=1797, seed=RECIPE["split_seed"], train_fraction=RECIPE["train_fraction"]):
    """Seeded (train_idx, test_idx) permutation split the classifier is trained and measured on."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(train_fraction * n))
    return perm[:n_train], perm[n_train:]


def recipe_hash():
    """Short hash of RECIPE; part of the cache file name, so a recipe change retrains."""
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]


def cache_dir():
    """$SCM_FAST_CACHE, else ~/.cache/scm_fast."""
    return os.environ.get("SCM_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "scm_fast")


def classifier_path():
    """Where the cached classifier lives for the current recipe."""
    return os.path.join(cache_dir(), f"digits_classifier-{recipe_hash()}.safetensors")


@contextlib.contextmanager
def _deterministic_cpu():
    """One thread, deterministic algorithms and a private RNG: bitwise-reproducible training."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)


def _shift_batch(x, gen):
    """Each image moved by a random offset in {-1, 0, 1}^2, background (-1) filled in."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    crops = torch.stack([padded[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)])  # (9, N, 1, H, W)
    pick = torch.randint(0, 9, (n,), generator=gen)
    return crops[pick, torch.arange(n)]


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def train_digits_classifier():
    """Train the classifier from RECIPE on the 80% split; returns it in eval mode with heldout_accuracy."""
    x, y = load_digits_images()
    train_idx, test_idx = digits_split(len(x))
    r = RECIPE
    with _deterministic_cpu():
        torch.manual_seed(r["seed"])
        gen = torch.Generator().manual_seed(r["seed"])
        model = DigitsClassifier()
        opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
        per_epoch = (len(train_idx) + r["batch"] - 1) // r["batch"]
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["epochs"] * per_epoch)
        for _ in range(r["epochs"]):
            order = train_idx[torch.randperm(len(train_idx), generator=gen)]
            for i in range(0, len(order), r["batch"]):
                idx = order[i:i + r["batch"]]
                loss = F.cross_entropy(model(_shift_batch(x[idx], gen)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        model.heldout_accuracy = _accuracy(model, x[test_idx], y[test_idx])
    return model


def _save_atomic(model, path):
    """Write the state dict and metadata to a temp file in the same folder, then os.replace it."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(path), exist_ok=True)
    meta = {"recipe": json.dumps(RECIPE, sort_keys=True), "heldout_accuracy": repr(model.heldout_accuracy),
            "torch": torch.__version__}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load(path):
    """The cached classifier, or None when the file is unreadable or from another recipe."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("recipe") != json.dumps(RECIPE, sort_keys=True):
            return None
        model = DigitsClassifier()
        model.load_state_dict(load_file(path))
    except Exception:  # a truncated or foreign file: retrain and overwrite
        return None
    model.heldout_accuracy = float(meta["heldout_accuracy"])
    return model.eval()


def digits_classifier():
    """The eval-mode digits classifier: loaded from the cache, or trained (seconds) and cached."""
    path = classifier_path()
    model = _load(path) if os.path.exists(path) else None
    if model is None:
        model = train_digits_classifier()
        _save_atomic(model, path)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---- image handling ------------------------------------------------------------------------------
def as_images(x, name="images"):
    """float (N, C, H, W) in [-1, 1] from a tensor/array that is float NCHW or uint8 NHWC."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or numpy array, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-d (N, C, H, W) float or (N, H, W, C) uint8, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        if x.shape[-1] not in (1, 3):
            raise ValueError(f"{name}: uint8 images must be (N, H, W, C) with C in (1, 3), got shape {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be float in [-1, 1] or uint8, got dtype {x.dtype}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be (N, C, H, W) with C in (1, 3), got shape {tuple(x.shape)}")
    return x.float()


def _batches(x, batch):
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    for i in range(0, len(x), batch):
        yield x[i:i + batch]


def digits_features(images, batch=256):
    """Classifier features of images float (N, 1|3, H, W) in [-1, 1] -> float64 numpy (N, 128).

    3 channels are averaged; other sizes are resized to 8x8 (bilinear, antialiased)."""
    x = as_images(images)
    model = digits_classifier()
    out = []
    with torch.no_grad():
        for xb in _batches(x, batch):
            xb = xb.mean(1, keepdim=True)
            if xb.shape[-2:] != (8, 8):
                xb = F.interpolate(xb, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
            out.append(model.features(xb).double())
    return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM))


# ---- TorchScript feature extractors (local files only) -------------------------------------------
_EXAMPLES = {
    "inception": "inception-2015-12-05.pt, NVlabs' TorchScript Inception-v3 from the stylegan2-ada-pytorch metrics",
    "dinov2": "a DINOv2 ViT you exported with torch.jit.trace or torch.jit.script",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TS_CACHE = {}


def _load_torchscript(path, kind):
    """torch.jit.load of a local file, kept per (path, mtime) for the process."""
    if kind not in _EXAMPLES:
        raise ValueError(f"kind must be one of {sorted(_EXAMPLES)}, got {kind!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} weights not found at {path}: scm_fast never downloads weights; "
                                f"pass a local TorchScript file (e.g. {_EXAMPLES[kind]})")
    key = (os.path.abspath(path), os.path.getmtime(path))
    if key not in _TS_CACHE:
        _TS_CACHE.clear()
        with warnings.catch_warnings():  # torch 2.13 marks torch.jit.load deprecated; it is the format asked for
            warnings.simplefilter("ignore", DeprecationWarning)
            _TS_CACHE[key] = torch.jit.load(path, map_location="cpu").eval()
    return _TS_CACHE[key]


def _inception_input(x):
    """[-1, 1] float (N, 3, H, W) -> uint8 (N, 3, H, W) RGB, the NVlabs detector's input."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _dinov2_input(x):
    """[-1, 1] float (N, 3, H, W) -> 224x224, ImageNet mean/std normalised."""
    x = (x + 1) / 2
    if x.shape[-2:] != (224, 224):
        x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _takes_return_features(model):
    """Whether forward has a return_features argument (from the TorchScript schema); None if unknown."""
    try:
        return "return_features" in [a.name for a in model.forward.schema.arguments]
    except (AttributeError, RuntimeError):
        return None


def _call_inception(model, x, state):
    """model(x, return_features=True) when forward takes that keyword, else model(x)."""
    if "keyword" not in state:
        state["keyword"] = _takes_return_features(model)
    if state["keyword"] is None:  # no schema: try the keyword once, settle on what works
        try:
            out = model(x, return_features=True)
            state["keyword"] = True
            return out
        except (TypeError, RuntimeError):
            state["keyword"] = False
    return model(x, return_features=True) if state["keyword"] else model(x)


def torchscript_features(path, images, kind, batch=64):
    """Features of images float (N, 1|3, H, W) in [-1, 1] from a local TorchScript model -> float64 (N, D).

    kind "inception": uint8 RGB NCHW input at the images' size, model(x, return_features=True) (or model(x)).
    kind "dinov2": float input resized to 224, ImageNet-normalised, model(x). Grayscale is repeated to RGB."""
    model = _load_torchscript(path, kind)
    x = as_images(images)
    prep = _inception_input if kind == "inception" else _dinov2_input
    state, out = {}, []
    with torch.no_grad():
        for xb in _batches(x, batch):
            xb = prep(xb.expand(-1, 3, -1, -1) if xb.shape[1] == 1 else xb)
            f = _call_inception(model, xb, state) if kind == "inception" else model(xb)
            if not isinstance(f, torch.Tensor) or f.dim() != 2 or len(f) != len(xb):
                shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise ValueError(f"{kind} model at {path} must return features (N, D) with N={len(xb)}, got {shape}")
            out.append(f.double())
    if not out:
        raise ValueError("images must hold at least one image, got 0")
    return torch.cat(out).numpy()


# ---- statistics ------------------------------------------------------------------------------------
def _as_feats(feats, name):
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"{name} must be 2-d (N, D), got shape {f.shape}")
    return f


def feature_stats(feats):
    """(mu (D,), sigma (D, D)) of features (N, D), N >= 2; sigma is the unbiased covariance."""
    f = _as_feats(feats, "feats")
    if len(f) < 2:
        raise ValueError(f"feats needs at least 2 rows for a covariance, got {len(f)}")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(s):
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), clipped at >= 0.

    tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): a symmetric PSD matrix, so eigh is stable even
    when S1 S2 is singular (fewer samples than dimensions)."""
    mu1, mu2 = np.asarray(mu1, np.float64).reshape(-1), np.asarray(mu2, np.float64).reshape(-1)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = len(mu1)
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"expected mu1, mu2 of shape ({d},) and sigma1, sigma2 of shape ({d}, {d}), got "
                         f"{mu1.shape}, {mu2.shape}, {s1.shape}, {s2.shape}")
    r1 = _psd_sqrt(s1)
    w = np.linalg.eigvalsh(r1 @ s2 @ r1)
    covmean_tr = np.sqrt(np.clip(w, 0, None)).sum()
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * covmean_tr)
    return max(fd, 0.0)


def _chunk_rows(n_cols, budget=1 << 22):
    """Rows per chunk so a (rows, n_cols) distance block stays near `budget` elements."""
    return max(1, budget // max(1, n_cols))


def _kth_radii(f, k):
    """Distance from each row of f to its k-th nearest other row (self excluded)."""
    out, step = [], _chunk_rows(len(f))
    for i in range(0, len(f), step):
        d = torch.cdist(f[i:i + step], f)
        out.append(d.kthvalue(k + 1, dim=1).values)     # the 1st is the point itself, at 0
    return torch.cat(out)


def _inside_fraction(queries, centers, radii):
    """Fraction of queries within radii[j] of some centers[j]."""
    hits = 0
    step = _chunk_rows(len(centers))
    for i in range(0, len(queries), step):
        d = torch.cdist(queries[i:i + step], centers)
        hits += (d <= radii[None, :]).any(dim=1).sum().item()
    return hits / len(queries)


def precision_recall(real_feats, fake_feats, k=3):
    """Improved precision and recall (Kynkaenniemi et al. 2019) with k-NN balls -> (precision, recall).

    precision: fraction of fake samples inside the union of the real k-NN balls; recall: the converse."""
    real = torch.from_numpy(_as_feats(real_feats, "real_feats"))
    fake = torch.from_numpy(_as_feats(fake_feats, "fake_feats"))
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real_feats and fake_feats must have the same width, got {real.shape[1]} and {fake.shape[1]}")
    if not isinstance(k, int) or k < 1 or k >= min(len(real), len(fake)):
        raise ValueError(f"k must be an int in [1, min(N_real, N_fake) - 1] = [1, {min(len(real), len(fake)) - 1}], "
                         f"got {k!r}")
    precision = _inside_fraction(fake, real, _kth_radii(real, k))
    recall = _inside_fraction(real, fake, _kth_radii(fake, k))
    return precision, recall


def reference_stats(path):
    """(mu, sigma) from an .npz with 'mu' (D,) and 'sigma' (D, D), the EDM/ADM FID reference format."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference stats file not found at {path}")
    with np.load(path) as data:
        missing = [key for key in ("mu", "sigma") if key not in data.files]
        if missing:
            raise KeyError(f"reference stats file {path} lacks key(s) {missing}; expected an .npz with 'mu' (D,) "
                           f"and 'sigma' (D, D) (the EDM/ADM FID reference format), found {data.files}")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"reference stats file {path}: expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    return mu, sigma


# ---- evaluate ----------------------------------------------------------------------------------------
def _extractor(features, batch):
    """features spec -> a function images -> (N, D) float64."""
    if features == "classifier":
        return lambda x: digits_features(x, batch=batch)
    kind, sep, path = features.partition(":")
    if kind in _EXAMPLES and sep and path:
        return lambda x: torchscript_features(path, x, kind, batch=batch)
    raise ValueError(f"features must be 'classifier', 'inception:PATH' or 'dinov2:PATH', got {features!r}")


def _resolve_reference(reference, features):
    """Reference images (float NCHW) or None."""
    if isinstance(reference, str):
        if reference != "digits":
            raise ValueError(f"reference must be 'digits', images or None, got {reference!r}")
        return load_digits_images()[0] if features == "classifier" else None
    if reference is None:
        return None
    return as_images(reference, "reference")


def evaluate(images, reference="digits", features="classifier", ref_stats=None, k=3, batch=256):
    """FD and precision/recall of generated images against a reference -> dict(fd, precision, recall, n, features).

    reference: "digits" (all 1797 digits; with features="classifier" only), images float (N, C, H, W) in
    [-1, 1], or None. ref_stats: an .npz path (mu, sigma) or a (mu, sigma) pair in the same feature space;
    when given it sets the FD's reference. Precision/recall need reference images, else they are None."""
    extract = _extractor(features, batch)
    x = as_images(images)
    ref = _resolve_reference(reference, features)
    if ref is None and ref_stats is None:
        raise ValueError(f"features={features!r} needs reference images (a float tensor in [-1, 1]) or ref_stats "
                         f"(an .npz with mu, sigma); reference='digits' applies to features='classifier' only")
    fake = extract(x)
    real = extract(ref) if ref is not None else None
    if ref_stats is not None:
        mu_r, sigma_r = reference_stats(ref_stats) if isinstance(ref_stats, (str, os.PathLike)) else ref_stats
    else:
        mu_r, sigma_r = feature_stats(real)
    mu_g, sigma_g = feature_stats(fake)
    precision = recall = None
    if real is not None:
        precision, recall = precision_recall(real, fake, k=k)
    return {"fd": frechet_distance(mu_g, sigma_g, mu_r, sigma_r), "precision": precision, "recall": recall,
            "n": len(fake), "features": features}


# ---- CLI ------------------------------------------------------------------------------------------------
def load_samples(path, key="images"):
    """Images from an .npz: 'images' uint8 (N, H, W, C) or float (N, C, H, W) in [-1, 1] -> float NCHW."""
    with np.load(path) as data:
        if key not in data.files:
            raise KeyError(f"{path} has no '{key}' array (found {data.files}); expected uint8 (N, H, W, C) images")
        return as_images(data[key], f"{path}['{key}']")


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def format_result(res, reference):
    """One line: 'FD 1.234  precision 0.91  recall 0.88  (n=1000, features=classifier, reference=digits)'."""
    return (f"FD {res['fd']:.3f}  precision {_fmt(res['precision'], '.2f')}  recall {_fmt(res['recall'], '.2f')}  "
            f"(n={res['n']}, features={res['features']}, reference={reference})")


def _parser():
    p = argparse.ArgumentParser(prog="python -m scm_fast.eval", description="FD and precision/recall of samples.")
    p.add_argument("--samples", required=True, help=".npz with 'images' uint8 (N, H, W, C) or float NCHW in [-1, 1]")
    p.add_argument("--ref", default="digits", help="'digits' or an .npz of reference images")
    p.add_argument("--features", default="classifier", help="classifier | inception:PATH | dinov2:PATH")
    p.add_argument("--ref-stats", default=None, help=".npz with mu, sigma (EDM/ADM FID reference format)")
    p.add_argument("--k", type=int, default=3, help="k of the k-NN balls for precision/recall")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--json", default=None, help="write the result here as JSON")
    return p


def _check_files(p, args):
    """argparse-style errors (exit 2) for any missing input file, naming its flag."""
    for flag, path in (("--samples", args.samples), ("--ref", None if args.ref == "digits" else args.ref),
                       ("--ref-stats", args.ref_stats)):
        if path is not None and not os.path.isfile(path):
            p.error(f"{flag}: file not found: {path}")
    kind, sep, path = args.features.partition(":")
    if args.features != "classifier":
        if kind not in _EXAMPLES or not sep or not path:
            p.error(f"--features: expected classifier, inception:PATH or dinov2:PATH, got {args.features!r}")
        if not os.path.isfile(path):
            p.error(f"--features: {kind} weights not found at {path}; scm_fast never downloads weights")


def main(argv=None):
    """CLI entry point; returns the result dict."""
    p = _parser()
    args = p.parse_args(argv)
    _check_files(p, args)
    samples = load_samples(args.samples)
    reference = "digits" if args.ref == "digits" else load_samples(args.ref)
    if args.ref == "digits" and args.features != "classifier":
        reference = None
    res = evaluate(samples, reference=reference, features=args.features, ref_stats=args.ref_stats,
                   k=args.k, batch=args.batch)
    ref_name = args.ref_stats if args.ref_stats and reference is None else args.ref
    print(format_result(res, ref_name))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**res, "reference": ref_name, "samples": args.samples}, f, indent=2)
    return res


if __name__ == "__main__":
    try:
        main()
    except (ValueError, KeyError) as e:
        print(f"python -m scm_fast.eval: error: {e}", file=sys.stderr)
        sys.exit(2)
