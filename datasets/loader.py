"""Seeded data loaders: each sample's augmentation depends only on (seed, epoch, index)."""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

from util.misc import DistInfo


class SeededSampler(Sampler):
    """Yields (index, seed) pairs so each sample's augmentation depends only on (seed, epoch,
    index): the same with any number of workers, and reproducible after a resume."""

    def __init__(self, sampler: DistributedSampler, seed: int) -> None:
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (and give its samples their own seeds)."""
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = (self.seed * 1_000_003 + self.epoch * 7_919) % (2**31)
        return ((i, (base + i * 104_729) % (2**31)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's CPU generators for a block, then put back their states.

    With ``num_workers=0`` a sample is made in the training process itself, whose generators
    also drive the model's dropout and drop path: leaving them reseeded would make a run
    depend on the number of workers. Only the CPU generator of torch is touched, the one the
    transforms draw from; an accelerator's generators are never reseeded.
    """
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class SeededDataset(Dataset):
    """Seeds the RNGs for each sample's transform (see SeededSampler); the caller's RNG states are kept."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with seeded_rngs(seed):
            return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)


def accelerator_available() -> bool:
    """Whether a GPU-like device is present (``torch.accelerator`` exists from torch 2.6 only)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return bool(accelerator.is_available())
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps is not None and mps.is_available())


def build_loader(dataset: Dataset, dist_info: DistInfo, *, train: bool, batch_size: int,
                 seed: int, num_workers: int, pin_memory: bool) -> DataLoader:
    """Shuffled, seeded training loader or an ordered evaluation loader (sharded when distributed)."""
    # Pinned host memory only helps copies to an accelerator; without one torch warns.
    pin_memory = pin_memory and accelerator_available()
    # Each new iterator draws a base seed for its workers; from the loader's own generator,
    # not the global one, since that draw happens once per epoch without workers but only
    # once per run with persistent workers (the samples are seeded by SeededDataset anyway).
    common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))
    sampler = (DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                  shuffle=train, seed=seed) if train or dist_info.distributed
               else SequentialSampler(dataset))
    if train:
        # Dropping the last partial batch (as the paper) only when there is more than one.
        drop_last = len(sampler) > batch_size
        return DataLoader(SeededDataset(dataset), sampler=SeededSampler(sampler, seed),
                          drop_last=drop_last, **common)
    return DataLoader(dataset, sampler=sampler, drop_last=False, **common)
