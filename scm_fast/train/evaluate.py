"""Sample grids and the final FD of a run (rank 0 samples; the first EMA, or the raw weights).

Teachers sample with Heun, 18 steps (NFE 35) and CFG at --sample-guidance; consistency models and
MeanFlow in 1 and 2 steps [P §5.2]. The FD (digits only) scores --eval-n samples with cycling labels
and sampling seed = training seed + 1 in the digits classifier's features (scm_fast.eval)."""
import json

import torch

from scm_fast import images, runs, sample
from scm_fast.models import build_network
from scm_fast.train.distributed import full_like_params, full_state


def sample_settings(objective):
    """(name, steps) of the samplers a run of this objective is shown and scored with."""
    if objective == "diffusion":
        return [("heun-nfe35", 18)]
    return [("1step", 1), ("2step", 2)]


def grid_cond(ds, labels, n, scan=4096):
    """{key: (n, ...)} conditioning for n samples: per label, that of the first of the dataset's first
    `scan` samples with the label (class-level conditioning, as digits with class embeddings); without
    labels, that of the dataset's first n samples. None when the data has no conditioning keys."""
    if not ds.cond_keys:
        return None
    if labels is None or not ds.num_classes:
        idx = torch.arange(n) % len(ds)
    else:
        seen = ds.get_batch(torch.arange(min(scan, len(ds))))[1]
        first = {int(k): int((seen == k).nonzero()[0]) for k in seen.unique()}
        idx = torch.tensor([first.get(int(k), 0) for k in labels.cpu()])
    return ds.get_extra(idx)


class Evaluator:
    def __init__(self, cfg, proc, run_dir, log):
        self.cfg, self.proc, self.run_dir, self.log = cfg, proc, run_dir, log
        self._vae = None

    def sampling_net(self, parts):
        """An unwrapped copy of the network holding the first EMA (or the raw weights); None off rank 0
        (the gather is collective)."""
        if parts.ema is not None:
            weights = full_like_params(parts.raw_net, parts.ema.averaged(parts.ema.names[0]))
        else:
            weights = full_state(parts.raw_net)
        if self.proc.rank != 0:
            return None
        net = build_network(self.cfg, parts.data.shape, parts.num_classes, parts.spec).to(self.proc.device)
        runs.load_weights(net, weights, "the run's weights")
        return net.eval().requires_grad_(False)

    def _generate(self, net, parts, n, steps, seed, decode=False):
        """n samples in [-1, 1] (b, C, H, W); decode: latent samples through --vae to images."""
        labels = sample.class_labels(n, parts.num_classes, self.proc.device)
        cond = grid_cond(parts.data, labels, n)
        if cond and parts.data.num_classes == 0 and labels is not None:
            labels = torch.zeros_like(labels)
        x = sample.generate(net, self.cfg, parts.data.shape, n, steps, labels=labels, seed=seed,
                            device=self.proc.device, cond=cond)
        if decode and self.cfg.vae and parts.data.is_latent:
            if self._vae is None:
                from scm_fast.vae import VAE  # noqa: PLC0415 - imports diffusers
                self._vae = VAE(self.cfg.vae, self.proc.device)
            x = self._vae.decode(parts.data.denormalize(x))
        return x.clamp(-1, 1).cpu()

    def sample_grids(self, parts, tag):
        """samples/<tag>-<sampler>.png for each sampler (collective)."""
        net = self.sampling_net(parts)
        paths = []
        if net is not None:
            nrow = max(parts.num_classes, 8) if parts.num_classes else None
            for name, steps in sample_settings(self.cfg.objective):
                path = self.run_dir / "samples" / f"{tag}-{name}.png"
                x = self._generate(net, parts, self.cfg.n_grid, steps, self.cfg.seed, decode=True)
                images.save_grid(path, x, nrow=nrow)
                paths.append(path)
        self.proc.barrier()
        return paths

    def evaluate(self, parts):
        """{sampler: {fd, precision, recall, n}} on digits; {} elsewhere (collective)."""
        cfg = self.cfg
        if not cfg.eval_n or cfg.data != "digits":
            if cfg.eval_n and self.proc.rank == 0:
                self.log("eval: the built-in FD uses digits-classifier features; for other data run "
                         "python -m scm_fast.sample, then python -m scm_fast.eval with your feature weights")
            return {}
        net = self.sampling_net(parts)
        results = {}
        if net is not None:
            from scm_fast import eval as sfeval
            for name, steps in sample_settings(cfg.objective):
                r = sfeval.evaluate(self._generate(net, parts, cfg.eval_n, steps, cfg.seed + 1), reference="digits")
                results[name] = {k: r[k] for k in ("fd", "precision", "recall", "n")}
        self.proc.barrier()
        return results

    def export(self, parts):
        """--arch diffusers: RUN/diffusers/ from the first EMA (scm_fast.models.diffusers_export; collective)."""
        net = self.sampling_net(parts)
        if net is not None:
            from scm_fast.models import diffusers_export  # noqa: PLC0415
            times = [t for _, steps in sample_settings(self.cfg.objective) if self.cfg.objective != "diffusion"
                     for t in [sample.consistency_times(steps, self.cfg.sigma_d, self.cfg.t_mid)]]
            out = diffusers_export.export(net, self.run_dir / "diffusers", self.cfg, times or None)
            self.log(f"diffusers: {out} (save_pretrained of the first EMA)")
        self.proc.barrier()

    def finish(self, parts):
        """Final grids and FD; eval.json; RUN/diffusers/ for --arch diffusers."""
        if parts.spec is not None:
            self.export(parts)
        paths = self.sample_grids(parts, "final")
        results = self.evaluate(parts)
        if self.proc.rank == 0:
            self.log("samples: " + ", ".join(str(p) for p in paths))
            if results:
                (self.run_dir / "eval.json").write_text(json.dumps(results, indent=2))
                self.log("eval: " + "; ".join(f"{k}: FD {v['fd']:.3f} precision {v['precision']:.3f} "
                                              f"recall {v['recall']:.3f}" for k, v in results.items()))
