"""Resumable, shardable data streams for iteration-based training.

A training run is a number of iterations, not epochs, and the source and target domains have
different lengths. Each domain is an endless stream of batches whose order and augmentation are
a pure function of (seed, epoch, position):

* ``EpochSampler`` shuffles with a generator seeded by (seed, epoch) and shards the permutation
  across ranks (torchrun), like DistributedSampler, reshuffling every epoch;
* every sample carries its own augmentation seed, so a batch is identical whichever worker
  loads it, and a resumed run only has to skip to the right position, without loading the
  batches it skips.
"""
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.distributed import get_rank, get_world_size
from utils.seed import SEED_STRIDE as _SEED_STRIDE, ignore_stop_signals, make_generator, seed_worker


class SeededSamples(Dataset):
    """Wraps a dataset so that ``dataset[(index, seed)]`` runs its random transforms from ``seed``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index_and_seed):
        index, seed = index_and_seed
        # fork_rng keeps the caller's global RNG untouched when loading in the main process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class EpochSampler(Sampler):
    """Yields ``(index, sample_seed)`` for one epoch of one rank, starting at ``start`` (in samples)."""

    def __init__(self, dataset_length, batch_size, seed=0, shuffle=True, rank=None, world_size=None):
        self.dataset_length = dataset_length
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        self.epoch = 0
        self.start_batch = 0
        global_batch = batch_size * self.world_size
        self.batches_per_epoch = dataset_length // global_batch  # drop_last: every step sees full batches
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{dataset_length} samples are fewer than one global batch of {global_batch} "
                f"(batch size {batch_size} x {self.world_size} processes); lower --batch-size"
            )

    def set_position(self, epoch, start_batch=0):
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_generator(self):
        """A generator seeded by (seed, epoch): the epoch's order is a pure function of both."""
        generator = torch.Generator()
        generator.manual_seed(self.seed * _SEED_STRIDE + self.epoch)
        return generator

    def _epoch_order(self):
        """Dataset indices; position p of the epoch reads ``order[p]`` (subclasses draw other orders)."""
        if not self.shuffle:
            return torch.arange(self.dataset_length)
        return torch.randperm(self.dataset_length, generator=self.epoch_generator())

    def __iter__(self):
        order = self._epoch_order()
        used = self.batches_per_epoch * self.batch_size * self.world_size
        # Global batch k holds positions [k*B*W, (k+1)*B*W); rank r takes its contiguous slice of
        # it, so a run on W processes sees exactly the samples of a one-process run of batch B*W.
        positions = torch.arange(used).view(self.batches_per_epoch, self.world_size, self.batch_size)
        positions = positions[self.start_batch:, self.rank].reshape(-1)
        epoch_seed = (self.seed * _SEED_STRIDE + self.epoch) * _SEED_STRIDE
        for position in positions.tolist():
            yield int(order[position]), epoch_seed + position

    def __len__(self):
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class BatchStream:
    """An endless, resumable iterator of batches over one dataset (one training domain)."""

    def __init__(self, dataset, batch_size, seed=0, num_workers=0, shuffle=True, pin_memory=False, sampler=None):
        # ``sampler``: an EpochSampler (subclass) of another order, e.g. uda's rare-class sampling.
        self.sampler = sampler if sampler is not None else EpochSampler(len(dataset), batch_size, seed=seed, shuffle=shuffle)
        self.loader = DataLoader(
            SeededSamples(dataset), batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
            pin_memory=pin_memory, drop_last=True, worker_init_fn=seed_worker,
            # Workers survive epoch boundaries (the sampler runs in the main process, so a new
            # epoch or a seek only changes which (index, seed) pairs they are sent).
            persistent_workers=num_workers > 0,
            # Own generator: creating an iterator must not consume the global RNG (exact resume).
            generator=make_generator(seed),
        )
        self.dataset = dataset
        self._iterator = None

    @property
    def batches_per_epoch(self):
        return self.sampler.batches_per_epoch

    def seek(self, iteration):
        """Position the stream so that the next batch is the one of global step ``iteration``."""
        epoch, start = divmod(iteration, self.batches_per_epoch)
        self.sampler.set_position(epoch, start)
        self._iterator = iter(self.loader)

    def __next__(self):
        if self._iterator is None:
            self.seek(0)
        try:
            return next(self._iterator)
        except StopIteration:
            self.sampler.set_position(self.sampler.epoch + 1, 0)
            self._iterator = iter(self.loader)
            return next(self._iterator)

    def __iter__(self):
        return self


class ShardedEvalSampler(Sampler):
    """Rank r evaluates samples r, r+W, r+2W, ...: no padding, so no image is counted twice."""

    def __init__(self, dataset_length, rank=None, world_size=None):
        self.indices = list(range(get_rank() if rank is None else rank, dataset_length,
                                  get_world_size() if world_size is None else world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def eval_loader(dataset, batch_size=1, num_workers=0, pin_memory=False):
    """Deterministic, sharded loader for evaluation and prediction passes."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardedEvalSampler(len(dataset)),
                      num_workers=num_workers, pin_memory=pin_memory, shuffle=False,
                      worker_init_fn=ignore_stop_signals)


def to_device(batch, device):
    """Move the tensors of a collated sample dict to ``device`` (non-blocking from pinned memory)."""
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}
