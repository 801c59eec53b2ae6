"""Tests for scm_fast.images (PNG codec, grids) and scm_fast.data (datasets, sharded sampler)."""
import struct
import zlib

import numpy as np
import pytest
import torch

from scm_fast import images
from scm_fast.data import ArrayData, ImageFolder, LatentData, build_dataset, digits, load_arrays
from scm_fast.loader import ShardedSampler
from scm_fast.images import make_grid, read_image, save_grid, to_uint8, write_png


def _rand_u8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# ----------------------------------------------------------------------------- hand-built PNGs (decoded by Pillow)

def _chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _filter_row(ftype, row, prior, bpp):
    """Forward PNG filter of one scanline (lists of ints) -> bytes with the filter-type byte first."""
    out = []
    for i, x in enumerate(row):
        a = row[i - bpp] if i >= bpp else 0
        b = prior[i]
        c = prior[i - bpp] if i >= bpp else 0
        pred = [0, a, b, (a + b) // 2, _paeth(a, b, c)][ftype]
        out.append((x - pred) % 256)
    return bytes([ftype] + out)


def _png_bytes(img, ctype, filters, depth=8, interlace=0, extra=()):
    """PNG bytes of uint8 samples img (H, W, bpp), one filter type per row from `filters`."""
    h, w, bpp = img.shape
    rows, prior = [], [0] * (w * bpp)
    for y in range(h):
        row = img[y].reshape(-1).tolist()
        rows.append(_filter_row(filters[y % len(filters)], row, prior, bpp))
        prior = row
    ihdr = struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, interlace)
    body = b"".join(_chunk(k, p) for k, p in extra)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + body
            + _chunk(b"IDAT", zlib.compress(b"".join(rows))) + _chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- PNG files

@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (5, 7, 1), (1, 1, 3), (7, 5, 3), (5, 7, 4), (3, 2, 2)])
def test_png_round_trip(tmp_path, shape):
    a = _rand_u8(shape, seed=sum(shape))
    path = tmp_path / "new" / "dir" / "img.png"
    write_png(path, a)
    back = read_image(path, keep_alpha=True)
    assert back.dtype == np.uint8 and back.shape == (shape if len(shape) == 3 else shape + (1,))
    np.testing.assert_array_equal(back.reshape(a.shape), a)
    assert sorted(p.name for p in path.parent.iterdir()) == ["img.png"]  # no temp file left behind


@pytest.mark.parametrize("filters", [[0], [1], [2], [3], [4], [0, 1, 2, 3, 4]], ids=str)
@pytest.mark.parametrize("ctype,bpp", [(0, 1), (2, 3), (6, 4)])
def test_png_filter_types(tmp_path, filters, ctype, bpp):
    img = _rand_u8((6, 5, bpp), seed=len(filters) + bpp)
    path = tmp_path / "f.png"
    path.write_bytes(_png_bytes(img, ctype, filters))
    np.testing.assert_array_equal(read_image(path, keep_alpha=True), img)


def test_png_paeth_and_average_ties(tmp_path):
    # few distinct values: predictor ties (pa == pb, pb == pc, ...) and odd (left + up) sums are frequent
    img = _rand_u8((9, 9, 1), seed=7) % 4 * 2 + np.arange(9, dtype=np.uint8).reshape(1, 9, 1) % 3
    img[0, 0], img[0, 1], img[1, 0] = 2, 4, 1  # at (1, 1): c=2, b=4, a=1 -> pb == pc < pa, Paeth picks b
    img[3, 3], img[3, 4], img[4, 3] = 2, 1, 4  # at (4, 4): c=2, b=1, a=4 -> pa == pc < pb, Paeth picks a
    for ftype in (3, 4):
        path = tmp_path / f"t{ftype}.png"
        path.write_bytes(_png_bytes(img, 0, [ftype]))
        np.testing.assert_array_equal(read_image(path, keep_alpha=True), img)


def test_png_palette(tmp_path):
    pal = _rand_u8((4, 3), seed=3)
    idx = np.array([[0, 1, 2], [3, 2, 1]], np.uint8)[:, :, None]
    path = tmp_path / "p.png"
    path.write_bytes(_png_bytes(idx, 3, [4, 1], extra=[(b"PLTE", pal.tobytes())]))
    np.testing.assert_array_equal(read_image(path), pal[idx[:, :, 0]])
    path.write_bytes(_png_bytes(idx, 3, [2], extra=[(b"PLTE", pal.tobytes()), (b"tRNS", bytes([0, 128]))]))
    rgba = read_image(path, keep_alpha=True)
    assert rgba.shape == (2, 3, 4)
    np.testing.assert_array_equal(rgba[:, :, :3], pal[idx[:, :, 0]])
    np.testing.assert_array_equal(rgba[:, :, 3], np.array([[0, 128, 255], [255, 255, 128]]))


def test_png_16_bit_gray_decodes_to_its_high_byte(tmp_path):
    """A variant the old built-in decoder refused: Pillow reads it, and read_image keeps the high byte
    (Pillow's own convert("L") would clip every value above 255)."""
    from PIL import Image
    img = _rand_u8((4, 5), seed=5).astype(np.uint16) * 257  # 16-bit samples whose high byte is the image
    Image.fromarray(img).save(tmp_path / "p.png")  # mode I;16
    np.testing.assert_array_equal(read_image(tmp_path / "p.png")[:, :, 0], (img >> 8).astype(np.uint8))


def test_png_corrupt_and_bad_input(tmp_path):
    path = tmp_path / "bad.png"
    good = bytearray(_png_bytes(_rand_u8((2, 2, 3)), 2, [0]))
    good[-20] ^= 0xFF  # inside the IDAT payload: its CRC no longer matches
    path.write_bytes(bytes(good))
    with pytest.raises(ValueError, match="bad.png: cannot decode the image"):
        read_image(path)
    path.write_bytes(b"GIF89a....")
    with pytest.raises(ValueError, match="bad.png: cannot decode the image"):
        read_image(path)
    with pytest.raises(TypeError, match="array must be uint8, got dtype float32"):
        write_png(tmp_path / "x.png", np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"got shape \(2, 2, 5\)"):
        write_png(tmp_path / "x.png", np.zeros((2, 2, 5), np.uint8))


def test_to_uint8_rounds_and_clips():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 6).expand(2, 3, 1, 6)
    u = to_uint8(x)
    assert u.shape == (2, 1, 6, 3) and u.dtype == np.uint8
    np.testing.assert_array_equal(u[0, 0, :, 0], [0, 0, 128, 191, 255, 255])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\), got \(3, 4\)"):
        to_uint8(torch.zeros(3, 4))


def test_make_grid_shape_and_padding():
    x = torch.ones(5, 3, 4, 6)  # white images
    g = make_grid(x)  # nrow = ceil(sqrt(5)) = 3 -> 2 rows
    assert g.shape == (2 * (4 + 1) + 1, 3 * (6 + 1) + 1, 3) and g.dtype == np.uint8
    assert (g[0] == 0).all() and (g[:, 0] == 0).all() and (g[5] == 0).all() and (g[:, 7] == 0).all()
    assert (g[1:5, 1:7] == 255).all() and (g[6:10, 8:14] == 255).all()
    assert (g[6:10, 15:21] == 0).all()  # sixth cell: no image, black
    assert (g == 255).sum() == 5 * 4 * 6 * 3
    g1 = make_grid(torch.zeros(4, 1, 2, 3), nrow=4, pad=0)
    assert g1.shape == (2, 12, 1) and (g1 == 128).all()
    with pytest.raises(ValueError, match="1 or 3 channels"):
        make_grid(torch.zeros(2, 2, 4, 4))


def test_save_grid_read_image(tmp_path):
    x = torch.rand(3, 3, 5, 5) * 2 - 1
    assert save_grid(tmp_path / "g" / "grid.png", x, nrow=3, min_size=1) == 1
    np.testing.assert_array_equal(read_image(tmp_path / "g" / "grid.png"), make_grid(x, nrow=3))
    # 5 px images, at least 32 px on screen: every pixel of the grid becomes a 7x7 block (nearest)
    assert save_grid(tmp_path / "big.png", x, nrow=3) == 7
    big, small = read_image(tmp_path / "big.png"), make_grid(x, nrow=3)
    assert big.shape[:2] == (small.shape[0] * 7, small.shape[1] * 7)
    np.testing.assert_array_equal(big[::7, ::7], small)
    np.testing.assert_array_equal(big[6::7, 6::7], small)
    write_png(tmp_path / "rgba.png", _rand_u8((3, 4, 4)))
    assert read_image(tmp_path / "rgba.png").shape == (3, 4, 3)  # alpha dropped
    write_png(tmp_path / "ga.png", _rand_u8((3, 4, 2)))
    assert read_image(tmp_path / "ga.png").shape == (3, 4, 1)
    from PIL import Image
    Image.fromarray(_rand_u8((6, 5, 3))).save(tmp_path / "photo.JPG", quality=95)
    assert read_image(tmp_path / "photo.JPG").shape == (6, 5, 3)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(ValueError, match=r"broken\.jpg: cannot decode the image"):
        read_image(tmp_path / "broken.jpg")


# ----------------------------------------------------------------------------- datasets

def test_digits():
    ds = digits()
    assert len(ds) == 1797 and ds.shape == (1, 8, 8) and ds.num_classes == 10
    x, y = ds.get_batch(torch.arange(1797))
    assert x.dtype == torch.float32 and x.shape == (1797, 1, 8, 8)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert 0.3 < float(x.std()) < 0.8  # about sigma_d
    assert ds.describe() == "digits: 1797 images of shape (1, 8, 8), 10 classes"
    big = digits(img_size=16)
    xb, _ = big.get_batch(torch.tensor([0, 5]))
    assert xb.shape == (2, 1, 16, 16) and float(xb.abs().max()) <= 1.0
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 1797\), got values in \[0, 1797\]"):
        ds.get_batch(torch.tensor([0, 1797]))


def test_array_data_validation():
    with pytest.raises(ValueError, match=r"images must be a float tensor \(N, C, H, W\)"):
        ArrayData(torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match=r"labels must be integers of shape \(4,\)"):
        ArrayData(torch.zeros(4, 1, 2, 2), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=2\)"):
        ArrayData(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 2, 1]), num_classes=2)
    ds = ArrayData(torch.zeros(4, 1, 2, 2))
    assert ds.num_classes == 0 and ds.get_batch(torch.tensor([1]))[1] is None
    assert "unlabeled" in ds.describe()


def _write_folder(root, spec):
    """spec: {relative path: uint8 array}; returns it."""
    for rel, a in spec.items():
        write_png(root / rel, a)
    return spec


def test_image_folder_with_classes(tmp_path):
    spec = _write_folder(tmp_path, {"dog/b.png": _rand_u8((4, 5, 3), 1), "cat/a.png": _rand_u8((4, 5), 2),
                                    "dog/sub/c.PNG": _rand_u8((4, 5, 3), 3)})
    (tmp_path / "empty").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path)
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert len(ds) == 3 and ds.shape == (3, 4, 5)  # one colour image -> 3 channels
    x, y = ds.get_batch(torch.tensor([0, 1, 2]))
    assert y.tolist() == [0, 1, 1] and x.dtype == torch.float32
    gray = torch.from_numpy(spec["cat/a.png"]).float() / 127.5 - 1
    torch.testing.assert_close(x[0], gray.expand(3, 4, 5), rtol=0, atol=0)  # expanded gray
    rgb = torch.from_numpy(spec["dog/b.png"]).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(x[1], rgb, rtol=0, atol=0)
    assert len(ds._cache) == 3
    x2, _ = ds.get_batch(torch.tensor([1]))  # from the cache
    torch.testing.assert_close(x2[0], x[1], rtol=0, atol=0)
    assert "folder: 3 images of shape (3, 4, 5), 2 classes" in ds.describe()


def test_image_folder_unlabeled_gray_and_cache_bound(tmp_path):
    _write_folder(tmp_path, {f"{i}.png": _rand_u8((3, 3), i) for i in range(4)})
    ds = ImageFolder(tmp_path, cache_bytes=2 * 9)
    assert ds.num_classes == 0 and ds.class_names == [] and ds.shape == (1, 3, 3)
    x, y = ds.get_batch(torch.tensor([3, 2, 1, 0]))
    assert y is None and x.shape == (4, 1, 3, 3) and len(ds._cache) == 2
    assert ImageFolder(tmp_path, channels=3).shape == (3, 3, 3)


def test_image_folder_resize_and_size_mismatch(tmp_path):
    _write_folder(tmp_path, {"a.png": np.full((6, 8, 3), 200, np.uint8), "b.png": np.full((10, 10), 40, np.uint8)})
    with pytest.raises(ValueError, match=r"different sizes \(a\.png is 6x8, b\.png is 10x10\); pass img_size"):
        ImageFolder(tmp_path)
    ds = ImageFolder(tmp_path, img_size=4)
    assert ds.shape == (3, 4, 4)
    x, _ = ds.get_batch(torch.tensor([0, 1]))
    assert x.shape == (2, 3, 4, 4)
    torch.testing.assert_close(x[0], torch.full((3, 4, 4), 200 / 127.5 - 1))
    torch.testing.assert_close(x[1], torch.full((3, 4, 4), 40 / 127.5 - 1))


def test_image_folder_mixed_layout_error(tmp_path):
    _write_folder(tmp_path, {"a.png": _rand_u8((2, 2)), "cls/b.png": _rand_u8((2, 2))})
    with pytest.raises(ValueError, match="mixes images directly in it"):
        ImageFolder(tmp_path)


def test_load_arrays_uint8_nhwc(tmp_path):
    a = _rand_u8((4, 5, 6, 3))
    np.savez(tmp_path / "d.npz", x=a, y=np.array([0, 2, 1, 2]))
    ds = load_arrays(tmp_path / "d.npz")
    assert len(ds) == 4 and ds.shape == (3, 5, 6) and ds.num_classes == 3
    x, y = ds.get_batch(torch.arange(4))
    torch.testing.assert_close(x, torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert y.tolist() == [0, 2, 1, 2]


def test_load_arrays_float_nchw_and_errors(tmp_path):
    a = np.random.default_rng(0).uniform(-1, 1, (3, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "f.npy", a)
    ds = load_arrays(tmp_path / "f.npy")
    assert ds.shape == (3, 4, 4) and ds.num_classes == 0
    torch.testing.assert_close(ds.get_batch(torch.arange(3))[0], torch.from_numpy(a))
    np.save(tmp_path / "big.npy", a * 255)
    with pytest.raises(ValueError, match=r"big\.npy: float images must be in \[-1, 1\], got absolute max"):
        load_arrays(tmp_path / "big.npy")
    np.savez(tmp_path / "k.npz", pixels=a)
    with pytest.raises(ValueError, match=r"k\.npz: no images .*'images', 'x', 'arr_0'.*\['pixels'\]"):
        load_arrays(tmp_path / "k.npz")


def _latents(tmp_path, **extra):
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(64, 4, 3, 3, generator=g) * torch.tensor([1.0, 3.0, 0.5, 8.0]).view(1, 4, 1, 1)
    lat = lat + torch.tensor([0.0, -2.0, 5.0, 1.0]).view(1, 4, 1, 1)
    np.savez(tmp_path / "lat.npz", latents=lat.numpy(), labels=np.arange(64) % 5, **extra)
    return lat


def test_latent_data_normalization(tmp_path):
    lat = _latents(tmp_path)
    ds = LatentData(tmp_path / "lat.npz", sigma_d=0.5)
    assert ds.shape == (4, 3, 3) and ds.num_classes == 5 and ds.mean.shape == (4,) and ds.std.shape == (4,)
    x, y = ds.get_batch(torch.arange(64))
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), correction=0), torch.full((4,), 0.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.denormalize(x), lat, atol=1e-5, rtol=1e-5)
    assert "latents(lat.npz): 64 images of shape (4, 3, 3), 5 classes" == ds.describe()


def test_latent_data_stats_from_file_and_args(tmp_path):
    lat = _latents(tmp_path, mean=np.array([1.0, 2.0, 3.0, 4.0]), std=np.array([2.0, 2.0, 2.0, 2.0]))
    ds = LatentData(tmp_path / "lat.npz", sigma_d=1.0)
    torch.testing.assert_close(ds.get_batch(torch.arange(64))[0], (lat - torch.arange(1.0, 5).view(1, 4, 1, 1)) / 2)
    ds2 = LatentData(tmp_path / "lat.npz", mean=0.0, std=[1.0, 1.0, 1.0, 4.0])
    torch.testing.assert_close(ds2.get_batch(torch.tensor([0]))[0][0, 3], lat[0, 3] / 4 * 0.5)
    with pytest.raises(ValueError, match=r"std must have one value per channel \(4\), got 2"):
        LatentData(tmp_path / "lat.npz", std=[1.0, 2.0])


def test_build_dataset(tmp_path):
    assert build_dataset("digits").shape == (1, 8, 8)
    assert build_dataset("digits", img_size=12).shape == (1, 12, 12)
    missing = tmp_path / "nope"
    msg = (rf"--data: {missing} does not exist \(expected 'digits', an image folder, "
           rf"a dataset folder \(dataset\.json\), a \.npy/\.npz file or latents:PATH\)")
    with pytest.raises(FileNotFoundError, match=msg):
        build_dataset(str(missing))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(f"latents:{missing}.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \.png/\.jpg/\.jpeg images under .*empty"):
        build_dataset(tmp_path / "empty")
    np.save(tmp_path / "none.npy", np.zeros((0, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"none\.npy: holds no images"):
        build_dataset(tmp_path / "none.npy")
    _write_folder(tmp_path / "imgs", {"a.png": _rand_u8((5, 7))})
    assert isinstance(build_dataset(tmp_path / "imgs", img_size=4), ImageFolder)
    _latents(tmp_path)
    assert isinstance(build_dataset(f"latents:{tmp_path / 'lat.npz'}", sigma_d=1.0), LatentData)
    np.save(tmp_path / "u.npy", _rand_u8((2, 4, 4)))
    assert build_dataset(tmp_path / "u.npy").shape == (1, 4, 4)
    with pytest.raises(ValueError, match="holds 4x4 images but img_size=8"):
        build_dataset(tmp_path / "u.npy", img_size=8)


# ----------------------------------------------------------------------------- sampler

def _steps(sampler, k):
    return [sampler.next() for _ in range(k)]


def test_sampler_deterministic_and_seeded():
    a, b = _steps(ShardedSampler(10, 4, seed=3), 5), _steps(ShardedSampler(10, 4, seed=3), 5)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = _steps(ShardedSampler(10, 4, seed=4), 5)
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    first = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 1_000_003))
    second = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 1_000_003 + 1))
    assert torch.equal(torch.cat(a)[:20], torch.cat([first, second]))


@pytest.mark.parametrize("n,batch", [(10, 5), (10, 3), (7, 16)])
def test_sampler_each_index_once_per_epoch(n, batch):
    s = ShardedSampler(n, batch, seed=1)
    steps = 3 * n  # covers batch * 3 epochs exactly
    stream = torch.cat(_steps(s, steps))
    assert stream.dtype == torch.int64 and stream.shape == (steps * batch,)
    for e in range(steps * batch // n):
        assert sorted(stream[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert s.images_seen == steps * batch and s.epoch == steps * batch // n


def test_sampler_rank_slices_concatenate():
    full = ShardedSampler(11, 6, seed=2)
    ranks = [ShardedSampler(11, 6, rank=r, world_size=2, seed=2) for r in range(2)]
    for _ in range(7):
        parts = [s.next() for s in ranks]
        assert all(p.shape == (3,) for p in parts)
        assert torch.equal(torch.cat(parts), full.next())


@pytest.mark.parametrize("warm", [1, 2, 3])  # n=10, batch 4: the third step crosses epochs
def test_sampler_resume_exact(warm):
    ref = ShardedSampler(10, 4, seed=5)
    expected = _steps(ref, warm + 4)
    s = ShardedSampler(10, 4, seed=5)
    _steps(s, warm)
    state = s.state_dict()
    assert set(state) == {"seed", "epoch", "pos", "n", "global_batch"}
    assert all(type(v) is int for v in state.values())
    resumed = ShardedSampler(10, 4, seed=999)  # the state's seed wins
    resumed.load_state_dict(state)
    assert resumed.images_seen == 4 * warm
    assert all(torch.equal(u, v) for u, v in zip(_steps(resumed, 4), expected[warm:]))
    halves = [ShardedSampler(10, 4, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)  # another world size resumes the same global stream
    assert torch.equal(torch.cat([h.next() for h in halves]), expected[warm])


def test_sampler_errors():
    s = ShardedSampler(10, 4)
    with pytest.raises(ValueError, match="state has n=12 but this sampler has n=10"):
        s.load_state_dict({**s.state_dict(), "n": 12})
    with pytest.raises(ValueError, match="state has global_batch=8 but this sampler has global_batch=4"):
        s.load_state_dict({**s.state_dict(), "global_batch": 8})
    with pytest.raises(ValueError, match="global_batch=10 is not divisible by world_size=3"):
        ShardedSampler(20, 10, world_size=3)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        ShardedSampler(20, 10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="n must be >= 1, got n=0"):
        ShardedSampler(0, 4)
    with pytest.raises(ValueError, match="global_batch must be >= 1, got global_batch=0"):
        ShardedSampler(5, 0)


# ----------------------------------------------------------------------------- bad input (issue 15)

def test_save_grid_any_channel_count(tmp_path):
    # latents (C = 4) and 5-channel arrays: each channel a grayscale tile, normalised over the batch
    g = torch.Generator().manual_seed(0)
    for c in (2, 4, 5):
        x = torch.randn(3, c, 5, 5, generator=g) * torch.arange(1.0, c + 1).view(1, c, 1, 1)
        assert save_grid(tmp_path / f"c{c}.png", x, nrow=3, min_size=1) == 1
        back = read_image(tmp_path / f"c{c}.png")
        # one cell per sample, its C tiles side by side; cells 2 black pixels apart
        assert back.shape == (5 + 4, 3 * (c * 5 + 2) + 2, 1)
        for ch in range(c):
            tile = back[2:7, 2 + ch * 5:2 + ch * 5 + 5, 0].astype(np.float32)
            v = x[:, ch]
            expect = ((x[0, ch] - v.min()) / (v.max() - v.min()) * 255).numpy()
            np.testing.assert_allclose(tile, expect, atol=1.0)
    # 1 and 3 channels are unchanged: pixels in [-1, 1], not normalised
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    save_grid(tmp_path / "rgb.png", x, min_size=1)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), make_grid(x))
    save_grid(tmp_path / "const.png", torch.full((2, 4, 3, 3), 0.3), min_size=1)  # constant channels: mid gray
    assert set(np.unique(read_image(tmp_path / "const.png"))) == {0, 128}


def _corrupt_idat(path):
    """Keep the PNG's header and CRCs valid, but make its pixel data an invalid zlib stream."""
    data, pos, body = path.read_bytes(), 8, b""
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        payload = data[pos + 8:pos + 8 + n]
        body += _chunk(kind, payload[:6] + b"\x00garbage" * 3 if kind == b"IDAT" else payload)
        pos += 12 + n
    path.write_bytes(data[:8] + body)


def test_image_folder_corrupt_png_is_named(tmp_path):
    _write_folder(tmp_path, {f"{i}.png": _rand_u8((4, 4, 3), i) for i in range(4)})
    _corrupt_idat(tmp_path / "2.png")
    assert images.image_info(tmp_path / "2.png") == (4, 4, 3)  # the header alone is fine
    # the whole folder fits the cache: it is decoded when the dataset is built, the bad file named
    with pytest.raises(ValueError, match=r"2\.png"):
        ImageFolder(tmp_path)
    with pytest.raises(ValueError, match=r"2\.png"):
        build_dataset(tmp_path)
    # too big for the cache: decoded lazily, and the first read names the file
    ds = ImageFolder(tmp_path, cache_bytes=2 * 48)
    ds.get_batch(torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match=r"2\.png.*(corrupt|cannot decode)"):
        ds.get_batch(torch.tensor([1, 2]))
    # truncated files as well: in the pixel data, and inside the header
    for size in (60, 20):
        (tmp_path / "2.png").write_bytes((tmp_path / "1.png").read_bytes()[:size])
        with pytest.raises(ValueError, match=r"2\.png"):
            ImageFolder(tmp_path)


def test_nonfinite_latents_are_refused(tmp_path):
    lat = np.random.default_rng(0).normal(size=(10, 4, 3, 3)).astype(np.float32)
    lat[3, 1, 0, 0], lat[3, 2, 1, 1], lat[7, 0, 0, 0] = np.nan, np.inf, -np.inf
    np.savez(tmp_path / "lat.npz", latents=lat, mean=np.zeros(4), std=np.ones(4))
    with pytest.raises(ValueError, match=r"lat\.npz: 3 non-finite values \(NaN/Inf\).*first in sample 3"):
        LatentData(tmp_path / "lat.npz")
    with pytest.raises(ValueError, match=r"lat\.npz: 3 non-finite"):
        build_dataset(f"latents:{tmp_path / 'lat.npz'}")
    np.savez(tmp_path / "stats.npz", latents=np.nan_to_num(lat), mean=np.array([0, np.nan, 0, 0]), std=np.ones(4))
    with pytest.raises(ValueError, match=r"stats\.npz.*mean must be finite"):
        LatentData(tmp_path / "stats.npz")


def test_nonfinite_float_images_are_refused(tmp_path):
    a = np.random.default_rng(0).uniform(-1, 1, (6, 3, 4, 4)).astype(np.float32)
    a[4, 0, 1, 2] = np.nan
    np.save(tmp_path / "f.npy", a)
    with pytest.raises(ValueError, match=r"f\.npy: 1 non-finite values \(NaN/Inf\).*first in sample 4"):
        load_arrays(tmp_path / "f.npy")


def test_load_arrays_layouts(tmp_path):
    # gray + alpha NHWC: alpha dropped (as for image files), one channel
    ga = _rand_u8((5, 8, 8, 2))
    np.save(tmp_path / "ga.npy", ga)
    ds = load_arrays(tmp_path / "ga.npy")
    assert ds.shape == (1, 8, 8)
    torch.testing.assert_close(ds.get_batch(torch.arange(5))[0], torch.from_numpy(ga[..., :1]).permute(0, 3, 1, 2)
                               .float() / 127.5 - 1)
    rgba = _rand_u8((3, 6, 6, 4))
    np.save(tmp_path / "rgba.npy", rgba)
    assert load_arrays(tmp_path / "rgba.npy").shape == (3, 6, 6)
    # 5 channels of 4x4 (NCHW) are not mistaken for NHWC
    np.save(tmp_path / "c5.npy", np.zeros((2, 5, 4, 4), np.float32))
    assert load_arrays(tmp_path / "c5.npy").shape == (5, 4, 4)
    np.save(tmp_path / "c4.npy", np.zeros((2, 4, 8, 8), np.float32))
    assert load_arrays(tmp_path / "c4.npy").shape == (4, 8, 8)
    # (N, 4, 4, 4) reads either way: a clear error, and a layout entry settles it
    cube = _rand_u8((2, 4, 4, 4))
    np.save(tmp_path / "cube.npy", cube)
    with pytest.raises(ValueError, match=r"cube\.npy: .*ambiguous.*'layout'.*NCHW.*NHWC"):
        load_arrays(tmp_path / "cube.npy")
    np.savez(tmp_path / "cube.npz", images=cube, layout="NHWC")
    x = load_arrays(tmp_path / "cube.npz").get_batch(torch.arange(2))[0]
    torch.testing.assert_close(x, torch.from_numpy(cube[..., :3]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    np.savez(tmp_path / "cube2.npz", images=cube, layout="NCHW")
    assert load_arrays(tmp_path / "cube2.npz").shape == (4, 4, 4)
    np.savez(tmp_path / "cube3.npz", images=cube, layout="HWC")
    with pytest.raises(ValueError, match=r"cube3\.npz: layout must be 'NCHW' or 'NHWC', got 'HWC'"):
        load_arrays(tmp_path / "cube3.npz")


def test_truncated_or_corrupt_array_files(tmp_path):
    np.savez(tmp_path / "ok.npz", x=_rand_u8((20, 8, 8, 3)), y=np.arange(20) % 3)
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.npz: not a readable \.npz \(truncated or corrupt"):
        load_arrays(tmp_path / "cut.npz")
    with pytest.raises(ValueError, match=r"cut\.npz: not a readable \.npz"):
        build_dataset(f"latents:{tmp_path / 'cut.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 50)
    with pytest.raises(ValueError, match=r"junk\.npz: not a readable \.npz"):
        build_dataset(tmp_path / "junk.npz")
    np.save(tmp_path / "ok.npy", np.zeros((20, 3, 8, 8), np.float32))
    data = (tmp_path / "ok.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.npy: not a readable \.npy \(truncated or corrupt"):
        load_arrays(tmp_path / "cut.npy")


def test_build_dataset_needs_square_images(tmp_path):
    np.savez(tmp_path / "rect.npz", x=_rand_u8((5, 8, 6, 3)))
    with pytest.raises(ValueError, match=r"rect\.npz holds 8x6 images.*square.*--img-size"):
        build_dataset(tmp_path / "rect.npz")
    np.savez(tmp_path / "rlat.npz", latents=np.zeros((3, 4, 4, 2), np.float32) + np.arange(2))
    with pytest.raises(ValueError, match=r"rlat\.npz holds 4x2 images.*square"):
        build_dataset(f"latents:{tmp_path / 'rlat.npz'}")
    _write_folder(tmp_path / "imgs", {"a.png": _rand_u8((6, 8)), "b.png": _rand_u8((6, 8))})
    with pytest.raises(ValueError, match=r"6x8 images.*square.*--img-size"):
        build_dataset(tmp_path / "imgs")
    assert build_dataset(tmp_path / "imgs", img_size=4).shape == (1, 4, 4)
    assert ImageFolder(tmp_path / "imgs").shape == (1, 6, 8)  # the dataset itself may be non-square


def test_image_folder_preload(tmp_path):
    _write_folder(tmp_path, {f"{i}.png": _rand_u8((3, 3), i) for i in range(4)})
    assert len(ImageFolder(tmp_path)._cache) == 4  # all fit: decoded up front
    ds = ImageFolder(tmp_path, preload=False)
    assert len(ds._cache) == 0 and ds.preload() and len(ds._cache) == 4
    small = ImageFolder(tmp_path, cache_bytes=2 * 9)
    assert len(small._cache) == 0 and not small.preload() and len(small._cache) == 0
