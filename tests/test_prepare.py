"""python -m scm_fast.prepare: arrays and the digits -> dataset folders, with a tiny random diffusers
VAE (saved with save_pretrained) for latents, conditioning per sample and per class, and its errors."""
import json

import numpy as np
import pytest
import torch

from scm_fast import data, prepare, shards
from scm_fast.vae import VAE
from test_train import TINY, kimg, run


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=8)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


def _prepare(*argv):
    assert prepare.main([str(a) for a in argv]) == 0


def test_uint8_array_roundtrips_exactly(tmp_path):
    a = np.random.default_rng(0).integers(0, 255, (30, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=a, labels=np.arange(30) % 4)
    _prepare(tmp_path / "a.npz", tmp_path / "out", "--shard-size", "8", "--batch", "7")
    src, got = data.load_arrays(tmp_path / "a.npz"), data.build_dataset(str(tmp_path / "out"))
    idx = torch.arange(30)
    assert torch.equal(src.get_batch(idx)[0], got.get_batch(idx)[0])
    assert torch.equal(src.get_batch(idx)[1], got.get_batch(idx)[1]) and got.num_classes == 4
    index = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert index["keys"]["x"]["dtype"] == "uint8" and len(index["shards"]) == 4


def test_latents_with_a_local_vae_and_per_class_conditioning(tmp_path, vae_dir):
    emb = np.random.default_rng(1).standard_normal((10, 5, 16)).astype(np.float32)
    np.savez(tmp_path / "classes.npz", encoder_hidden_states=emb)
    _prepare("digits", tmp_path / "lat", "--vae", vae_dir, "--cond-per-class", tmp_path / "classes.npz")
    ds = data.build_dataset(str(tmp_path / "lat"), sigma_d=0.5)
    assert ds.shape == (4, 4, 4) and ds.cond_keys == ("encoder_hidden_states",) and len(ds) == 1797
    digits = data.digits()
    idx = torch.tensor([0, 5, 1796])
    ref = VAE(vae_dir).encode(digits.get_batch(idx)[0])
    torch.testing.assert_close(ds.denormalize(ds.get_batch(idx)[0]), ref, atol=2e-3, rtol=1e-3)  # fp16 storage
    labels = digits.get_batch(idx)[1]
    assert torch.equal(ds.get_extra(idx)["encoder_hidden_states"], torch.from_numpy(emb[labels.numpy()]))
    z = ds.get_batch(torch.arange(len(ds)))[0]  # normalized with the stored statistics: std sigma_d per channel
    torch.testing.assert_close(z.std(dim=(0, 2, 3), correction=0), torch.full((4,), 0.5), atol=2e-3, rtol=0)


def test_trainer_decodes_latent_grids_with_the_vae(tmp_path, vae_dir):
    _prepare("digits", tmp_path / "lat", "--vae", vae_dir)
    d = tmp_path / "run"
    run([*TINY, "--data", str(tmp_path / "lat"), "--run-dir", str(d), "--vae", str(vae_dir), "--sigma-d", "0.5",
         *kimg(2)])
    from PIL import Image
    grid = Image.open(next((d / "samples").glob("final-1step.png")))
    assert grid.mode == "RGB"  # decoded 3-channel images, not 4 latent-channel tiles


def test_vae_on_pixel_data_is_refused(tmp_path, vae_dir):
    p = run([*TINY, "--data", "digits", "--run-dir", str(tmp_path / "run"), "--vae", str(vae_dir), *kimg(1)],
            check=False)
    assert p.returncode == 1 and "decodes latent data, but --data digits holds pixels" in p.stderr
    assert not (tmp_path / "run").exists()


def test_prepare_errors_name_what_is_wrong(tmp_path, vae_dir, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert prepare.main(["digits", str(tmp_path / "full")]) == 1
    assert "exists and is not an empty folder (nothing is overwritten)" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert prepare.main(["digits", str(tmp_path / "o1"), "--vae", str(tmp_path)]) == 1
    assert "not a diffusers model folder (no config.json" in capsys.readouterr().err
    np.savez(tmp_path / "short.npz", encoder_hidden_states=np.zeros((5, 2, 3), np.float32))
    assert prepare.main(["digits", str(tmp_path / "o2"), "--cond", str(tmp_path / "short.npz")]) == 1
    assert "'encoder_hidden_states' must be numeric with at least 1797 rows" in capsys.readouterr().err
    bad = np.zeros((10, 3), np.float32)
    bad[4, 1] = np.nan
    np.savez(tmp_path / "nan.npz", pooled_projections=bad)
    assert prepare.main(["digits", str(tmp_path / "o3"), "--cond-per-class", str(tmp_path / "nan.npz")]) == 1
    assert "non-finite values (NaN/Inf) in the array 'pooled_projections', the first in sample 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare.main(["digits", str(tmp_path / "o4"), "--batch", "0"])
    assert not shards.is_shards(tmp_path / "o4")


def test_autoencoder_dc_latents(tmp_path):
    """Sana's DC-AE family (AutoencoderDC: its `latent`, no posterior) through the same path."""
    from diffusers import AutoencoderDC
    torch.manual_seed(0)
    dc = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=4, encoder_block_out_channels=(8, 8),
                       decoder_block_out_channels=(8, 8), encoder_layers_per_block=(1, 1),
                       decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                       decoder_qkv_multiscales=((), ()))
    dc.save_pretrained(tmp_path / "pipe" / "vae")  # a pipeline folder: its vae/ is used
    a = np.random.default_rng(0).integers(0, 255, (12, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", a)
    _prepare(tmp_path / "a.npy", tmp_path / "lat", "--vae", tmp_path / "pipe", "--x-dtype", "float32")
    ds = data.build_dataset(str(tmp_path / "lat"))
    vae = VAE(tmp_path / "pipe")
    assert vae.class_name == "AutoencoderDC" and ds.shape == (4, 4, 4)
    x = data.load_arrays(tmp_path / "a.npy").get_batch(torch.arange(12))[0]
    torch.testing.assert_close(ds.denormalize(ds.get_batch(torch.arange(12))[0]), vae.encode(x), atol=1e-5, rtol=1e-5)
    assert vae.decode(vae.encode(x)).shape == (12, 3, 8, 8)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP text encoder with a word-level tokenizer, saved together (offline)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["[PAD]", "[UNK]", "a", "handwritten", "digit", "zero", "one", "two", "three", "four", "five", "six",
             "seven", "eight", "nine", "photo", "of"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                model_max_length=8)
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=8, projection_dim=12,
                                      pad_token_id=0, eos_token_id=1, bos_token_id=1)
    path = tmp_path_factory.mktemp("clip") / "text"
    transformers.CLIPTextModelWithProjection(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_class_captions_through_a_local_text_encoder(tmp_path, clip_dir):
    (tmp_path / "classes.txt").write_text("\n".join(f"a handwritten digit {n}" for n in NAMES) + "\n")
    _prepare("digits", tmp_path / "out", "--text-encoder", clip_dir, "--class-captions", tmp_path / "classes.txt",
             "--x-dtype", "float32")
    ds = data.build_dataset(str(tmp_path / "out"))
    assert sorted(ds.cond_keys) == ["encoder_attention_mask", "encoder_hidden_states", "pooled_projections"]
    idx = torch.tensor([0, 1, 1796])
    extra, labels = ds.get_extra(idx), ds.get_batch(idx)[1]
    from scm_fast.text import TextEncoder
    ref = TextEncoder(clip_dir).encode([f"a handwritten digit {NAMES[i]}" for i in labels.tolist()])
    assert extra["encoder_hidden_states"].shape == (3, 8, 16) and extra["encoder_hidden_states"].dtype == torch.float16
    torch.testing.assert_close(extra["encoder_hidden_states"].float(), ref["encoder_hidden_states"], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(extra["pooled_projections"].float(), ref["pooled_projections"], atol=2e-3, rtol=1e-3)
    assert torch.equal(extra["encoder_attention_mask"], ref["encoder_attention_mask"])
    assert extra["encoder_attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # 4 words, padded to 8


def test_caption_errors(tmp_path, clip_dir, capsys):
    (tmp_path / "few.txt").write_text("a photo\n")
    assert prepare.main(["digits", str(tmp_path / "o1"), "--text-encoder", str(clip_dir), "--captions",
                         str(tmp_path / "few.txt")]) == 1
    assert "1 lines, expected one per sample (1797)" in capsys.readouterr().err
    assert prepare.main(["digits", str(tmp_path / "o2"), "--captions", str(tmp_path / "few.txt")]) == 1
    assert "--text-encoder needs exactly one of --captions and --class-captions" in capsys.readouterr().err
    (tmp_path / "ten.txt").write_text("\n".join(NAMES))
    assert prepare.main(["digits", str(tmp_path / "o3"), "--text-encoder", str(tmp_path), "--class-captions",
                         str(tmp_path / "ten.txt")]) == 1
    assert "not a transformers model folder (no config.json" in capsys.readouterr().err
