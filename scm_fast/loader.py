"""The data order and the loader: ShardedSampler cuts one seeded global stream of epoch permutations
into per-rank batches that resume exactly from a state_dict; BatchLoader reads those batches from a
dataset (scm_fast.data) in worker processes ahead of the training step."""
import torch
import torch.utils.data


class ShardedSampler:
    """Deterministic batches from one global index stream, sliced per rank.

    The stream concatenates epoch permutations: epoch e is torch.randperm(n) under a generator seeded
    with seed * 1_000_003 + e. Each step takes the next global_batch indices (crossing epochs
    seamlessly, so every index appears once per epoch); rank r gets [r * local, (r + 1) * local) with
    local = global_batch // world_size. The stream does not depend on world_size, so a state_dict
    resumes on any number of ranks.
    """

    def __init__(self, n, global_batch, rank=0, world_size=1, seed=0):
        """n images; global_batch indices per step over all world_size ranks; seed >= 0."""
        n, global_batch, rank, world_size, seed = (int(v) for v in (n, global_batch, rank, world_size, seed))
        if n < 1:
            raise ValueError(f"ShardedSampler: n must be >= 1, got n={n}")
        if global_batch < 1:
            raise ValueError(f"ShardedSampler: global_batch must be >= 1, got global_batch={global_batch}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardedSampler: expected world_size >= 1 and 0 <= rank < world_size, "
                             f"got rank={rank}, world_size={world_size}")
        if global_batch % world_size:
            raise ValueError(f"ShardedSampler: global_batch={global_batch} is not divisible by "
                             f"world_size={world_size}")
        if seed < 0:
            raise ValueError(f"ShardedSampler: seed must be >= 0, got seed={seed}")
        self.n, self.global_batch, self.rank, self.world_size, self.seed = n, global_batch, rank, world_size, seed
        self.local_batch = global_batch // world_size
        self._epoch, self._pos, self._perm = 0, 0, None

    @property
    def epoch(self):
        """Epoch of the next index in the stream (= completed epochs)."""
        return self._epoch

    @property
    def images_seen(self):
        """Indices consumed from the global stream so far (all ranks together)."""
        return self._epoch * self.n + self._pos

    def _permutation(self):
        """This epoch's permutation of range(n), generated once per epoch."""
        if self._perm is None:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self._epoch) % (1 << 64))
            # int32 below 2^31 samples: 4 bytes a sample, the only per-rank memory that grows with n (the
            # same permutation as int64)
            dtype = torch.int32 if self.n < 2 ** 31 else torch.int64
            self._perm = torch.randperm(self.n, generator=g, dtype=dtype)
        return self._perm

    def _take(self, count):
        """Advance the global stream by `count` indices -> LongTensor (count,)."""
        pieces = []
        while count > 0:
            k = min(count, self.n - self._pos)
            pieces.append(self._permutation()[self._pos:self._pos + k])
            self._pos, count = self._pos + k, count - k
            if self._pos == self.n:
                self._epoch, self._pos, self._perm = self._epoch + 1, 0, None
        return torch.cat(pieces).to(torch.int64)

    def next(self):
        """The next step's indices for this rank: LongTensor (local_batch,)."""
        batch = self._take(self.global_batch)
        return batch[self.rank * self.local_batch:(self.rank + 1) * self.local_batch].clone()

    __next__ = next

    def __iter__(self):
        """An endless iterator over next()."""
        return self

    def state_dict(self):
        """{'seed', 'epoch', 'pos', 'n', 'global_batch'} as plain ints."""
        return {"seed": self.seed, "epoch": self._epoch, "pos": self._pos, "n": self.n,
                "global_batch": self.global_batch}

    def load_state_dict(self, state):
        """Resume the global stream exactly at `state` (from any world size with the same n, global_batch)."""
        missing = {"seed", "epoch", "pos", "n", "global_batch"} - set(state)
        if missing:
            raise ValueError(f"ShardedSampler.load_state_dict: missing keys {sorted(missing)}")
        for key in ("n", "global_batch"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"ShardedSampler.load_state_dict: state has {key}={int(state[key])} but this "
                                 f"sampler has {key}={getattr(self, key)}")
        epoch, pos = int(state["epoch"]), int(state["pos"])
        if epoch < 0 or not 0 <= pos <= self.n:
            raise ValueError(f"ShardedSampler.load_state_dict: expected epoch >= 0 and 0 <= pos <= n={self.n}, "
                             f"got epoch={epoch}, pos={pos}")
        self.seed, self._epoch, self._pos, self._perm = int(state["seed"]), epoch, pos, None
        if pos == self.n:
            self._epoch, self._pos = epoch + 1, 0


class _Fetch(torch.utils.data.Dataset):
    """A dataset keyed by index batches: fetch[idx] = (idx, *dataset.get_batch(idx)) (in a loader worker)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, idx):
        return (idx, *self.dataset.get_batch(idx), self.dataset.get_extra(idx))


class BatchLoader:
    """The batches of `sampler` from `dataset`, read by `workers` processes ahead of the training step.

    `sampler` (a ShardedSampler) stays the authority on the position: next() advances it by one batch,
    whatever the workers have read ahead, so its state_dict is what the step consumed and a resume
    restarts the workers from it (bit-exact: the indices, hence the batches, do not depend on the
    number of workers). workers = 0 reads in the calling process. Workers are forked on the first
    next() and keep `prefetch` batches each in flight; pin_memory pins the batches (CUDA) so that
    .to(device, non_blocking=True) overlaps the copy with compute.
    """

    def __init__(self, dataset, sampler, workers=0, pin_memory=False, prefetch=2):
        if int(workers) < 0:
            raise ValueError(f"BatchLoader: workers must be >= 0, got {workers}")
        self.dataset, self.sampler, self.workers = dataset, sampler, int(workers)
        self.pin_memory, self.prefetch, self._it = bool(pin_memory), int(prefetch), None

    def next(self):
        """(x float32 (b, C, H, W), labels int64 (b,) or None, {key: conditioning tensor (b, ...)}) of the
        sampler's next batch."""
        idx = self.sampler.next()
        if self.workers == 0:
            x, labels = self.dataset.get_batch(idx)
            extra = self.dataset.get_extra(idx)
            if self.pin_memory:
                x, extra = x.pin_memory(), {k: v.pin_memory() for k, v in extra.items()}
            return x, labels, extra
        if self._it is None:
            self._it = self._start()
        got, x, labels, extra = next(self._it)
        if not torch.equal(got, idx):  # the read-ahead stream left the sampler's: a bug, never silent
            raise RuntimeError(f"BatchLoader: the workers read batch {got[:4].tolist()}... where the sampler "
                               f"is at {idx[:4].tolist()}...")
        return x, labels, extra

    def _start(self):
        """Workers reading from the batch the sampler has just handed out (so it is one batch ahead)."""
        s = self.sampler
        seen = s.images_seen - s.global_batch
        ahead = ShardedSampler(s.n, s.global_batch, s.rank, s.world_size, s.seed)
        ahead.load_state_dict(dict(s.state_dict(), epoch=seen // s.n, pos=seen % s.n))
        loader = torch.utils.data.DataLoader(_Fetch(self.dataset), sampler=ahead, batch_size=None,
                                             num_workers=self.workers, pin_memory=self.pin_memory,
                                             prefetch_factor=self.prefetch)
        return iter(loader)

    def close(self):
        """Stop the workers (they also stop with the process)."""
        self._it = None
