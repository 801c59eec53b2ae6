"""`python -m scm_fast.prepare SRC OUT`: training data -> a dataset folder of .npy shards (scm_fast.shards).

    python -m scm_fast.prepare photos/ data/photos-64 --img-size 64               # uint8 images
    python -m scm_fast.prepare photos/ data/photos-lat --img-size 256 --vae sd-vae/  # latents + mean/std
    python -m scm_fast.prepare digits data/digits-text --cond-per-class class_emb.npz --x-dtype float32
    python -m scm_fast.prepare photos/ data/photos-t5 --vae vae/ --text-encoder t5/ --captions captions.txt

SRC is what --data takes (digits, an image folder, a .npy/.npz array, a dataset folder), read in order
and written shard by shard, so it may be larger than memory. --vae encodes the images with a local
diffusers AutoencoderKL / AutoencoderDC (scm_fast.vae) and stores the per-channel mean and std of the
latents in the index (the trainer normalizes with them). Per-sample conditioning comes from an .npz
of arrays with one row per sample (--cond) or per class label (--cond-per-class), or from captions
embedded by a local transformers text encoder (--text-encoder with --captions or --class-captions:
encoder_hidden_states, encoder_attention_mask and, where the model pools, pooled_projections, in
float16 / uint8); each array becomes a key that reaches the network as a keyword argument of its
name. The null conditioning that classifier-free guidance and label dropout use is --null (an .npz
of one sample per key) or, with --text-encoder, the embedding of --null-caption (default: the
empty caption). OUT must not exist or be empty.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from scm_fast import data, images, shards


def _cond_arrays(path, rows, what):
    """{key: array} of an .npz whose arrays have `rows` rows, numeric and finite; ValueError naming the file."""
    if path is None:
        return {}
    files = data._read_numpy(Path(path))[1]
    if not files:
        raise ValueError(f"{what} {path}: expected an .npz of named arrays")
    for key, a in files.items():
        if key in ("x", "labels"):
            raise ValueError(f"{what} {path}: {key!r} is reserved (the images and the labels)")
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or a.ndim < 1 or len(a) < rows:
            raise ValueError(f"{what} {path}: {key!r} must be numeric with at least {rows} rows, got "
                             f"{a.dtype} {a.shape}")
        if np.issubdtype(a.dtype, np.floating):
            data._check_finite(a, path, f"array {key!r}")
    return files


def _read_lines(path, count, flag):
    lines = Path(path).read_text().splitlines()
    if len(lines) < count:
        raise ValueError(f"{flag} {path}: {len(lines)} lines, expected one per "
                         f"{'class' if flag == '--class-captions' else 'sample'} ({count})")
    return lines


def _captions(args, ds):
    """(TextEncoder, captions) for --text-encoder, else (None, None)."""
    given = [f for f in ("captions", "class_captions") if getattr(args, f)]
    if bool(args.text_encoder) != bool(given) or len(given) > 1:
        raise ValueError("--text-encoder needs exactly one of --captions and --class-captions, and they need it")
    if not args.text_encoder:
        return None, None
    if args.class_captions and not ds.num_classes:
        raise ValueError(f"--class-captions {args.class_captions}: {args.src} has no class labels")
    captions = (_read_lines(args.class_captions, ds.num_classes, "--class-captions") if args.class_captions
                else _read_lines(args.captions, len(ds), "--captions"))
    from scm_fast.text import TextEncoder  # noqa: PLC0415 - imports transformers
    return TextEncoder(args.text_encoder, args.device, args.max_length or None), captions


def _null(args, text):
    """{key: one sample} of the null conditioning: --null's arrays, else the text encoder's embedding of
    --null-caption; {} when there is neither."""
    if args.null:
        return _cond_arrays(args.null, 1, "--null")  # (1, ...) or (...): ShardWriter checks the size
    if text is None:
        return {}
    emb = text.encode([args.null_caption])
    return {k: v[0].numpy().astype(np.float16 if v.is_floating_point() else np.uint8) for k, v in emb.items()}


def _x_dtype(args):
    return np.dtype(args.x_dtype or ("float16" if args.vae else "uint8"))


def _to_stored(x, dtype):
    """Images in [-1, 1] -> uint8 (round((x + 1) * 127.5), exact for uint8 sources) or floats."""
    if dtype == np.uint8:
        return images.to_uint8(x).transpose(0, 3, 1, 2)
    return x.numpy().astype(dtype)


def prepare(args, log=print):
    """Write args.out from args.src; -> the dataset folder."""
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"OUT {out}: exists and is not an empty folder (nothing is overwritten)")
    ds = data.build_dataset(args.src, args.img_size or None)
    per_sample = _cond_arrays(args.cond, len(ds), "--cond")
    per_class = _cond_arrays(args.cond_per_class, ds.num_classes, "--cond-per-class")
    if per_class and not ds.num_classes:
        raise ValueError(f"--cond-per-class {args.cond_per_class}: {args.src} has no class labels")
    text, captions = _captions(args, ds)
    null = _null(args, text)
    vae = None
    if args.vae:
        from scm_fast.vae import VAE  # noqa: PLC0415 - imports diffusers
        vae = VAE(args.vae, args.device)
    writer = shards.ShardWriter(out, "latents" if vae else "images", args.shard_size, ds.num_classes)
    stats, dtype = None, _x_dtype(args)
    for start in range(0, len(ds), args.batch):
        idx = torch.arange(start, min(start + args.batch, len(ds)))
        x, labels = ds.get_batch(idx)
        if vae is not None:
            x = vae.encode(x).cpu()
            stats = stats or data.ChannelStats(x.shape[1])
            stats.add(x.numpy())
        batch = dict(x=x.numpy().astype(dtype) if vae else _to_stored(x, dtype), **ds.get_extra(idx))
        if ds.num_classes:
            batch["labels"] = labels.numpy()
            batch.update({k: a[labels.numpy()] for k, a in per_class.items()})
        batch.update({k: a[idx.numpy()] for k, a in per_sample.items()})
        if text is not None:
            rows = labels.tolist() if args.class_captions else idx.tolist()
            emb = text.encode([captions[i] for i in rows])
            batch.update({k: v.numpy().astype(np.float16 if v.is_floating_point() else np.uint8) for k, v in emb.items()})
        writer.add(**batch)
    root = writer.close(null=null, **({} if stats is None else dict(mean=stats.mean, std=stats.std)))
    log(f"{root}: {len(ds)} samples of {'latents' if vae else 'images'} {tuple(batch['x'].shape[1:])} "
        f"{dtype.name}, keys {sorted(batch)}")
    return root


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m scm_fast.prepare", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("src", help="the data, as --data takes it: digits, an image folder, a .npy/.npz array, "
                                "a dataset folder")
    ap.add_argument("out", help="the dataset folder to write (absent or empty)")
    ap.add_argument("--vae", metavar="PATH", help="a local diffusers AutoencoderKL / AutoencoderDC folder "
                                                  "(save_pretrained): write its latents of the images")
    ap.add_argument("--img-size", type=int, default=0, help="resize (center crop) digits and image folders to "
                                                            "N x N; 0 = their own size")
    ap.add_argument("--x-dtype", choices=("uint8", "float16", "float32"),
                    help="how x is stored; default uint8 for images (exact for 8-bit sources), float16 for latents")
    ap.add_argument("--cond", metavar="NPZ", help="per-sample conditioning: arrays with one row per sample of "
                                                  "SRC, in its order (encoder_hidden_states (N, L, D), ...)")
    ap.add_argument("--cond-per-class", metavar="NPZ", help="conditioning per class: arrays with one row per "
                                                            "class label, written for each sample by its label")
    ap.add_argument("--text-encoder", metavar="PATH", help="a local transformers text encoder with its tokenizer "
                                                           "(save_pretrained; or a pipeline folder): embed the "
                                                           "captions of --captions / --class-captions")
    ap.add_argument("--captions", metavar="TXT", help="one caption per line, one line per sample of SRC")
    ap.add_argument("--class-captions", metavar="TXT", help="one caption per line, one line per class label")
    ap.add_argument("--null", metavar="NPZ", help="the null / negative conditioning for classifier-free guidance: "
                                                  "one sample per key (same keys as --cond / --cond-per-class)")
    ap.add_argument("--null-caption", default="", help="with --text-encoder: the caption whose embedding is the "
                                                       "null conditioning (default: the empty caption)")
    ap.add_argument("--max-length", type=int, default=0, help="tokens per caption; 0 = the tokenizer's "
                                                              "model_max_length (at most 512)")
    ap.add_argument("--batch", type=int, default=64, help="samples read (and encoded) at a time")
    ap.add_argument("--shard-size", type=int, default=65536, help="samples per shard file")
    ap.add_argument("--device", default="cpu", help="where the VAE runs (cpu, cuda)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    for flag in ("batch", "shard_size"):
        if getattr(args, flag) < 1:
            build_parser().error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    try:
        prepare(args)
    except (OSError, ValueError) as err:
        print(f"scm_fast.prepare: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
