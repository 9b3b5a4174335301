"""Seeded data plumbing of the bi-level trainer: the lower/upper split, the upper split's batch stream, seed mixing.

Everything here is a pure function of its seeds: a split, a stream position or a dropout seed is the same on every
machine, process count aside (streams shard by rank), and after a resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch.utils.data import Dataset

__all__ = ["BatchStream", "mix_seed", "seeded_rng", "split_indices"]


def split_indices(n: int, upper_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded random split of ``range(n)`` into (lower, upper) with ``round(n · upper_fraction)`` upper items.

    Raises:
        ValueError: ``upper_fraction`` outside [0, 1), or a split that would leave one side empty.
    """
    if not 0.0 <= upper_fraction < 1.0:
        raise ValueError(f"upper_fraction must be in [0, 1), got {upper_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_upper = int(round(n * upper_fraction))
    if upper_fraction > 0 and (n_upper == 0 or n_upper == n):
        raise ValueError(f"cannot split {n} examples with upper_fraction={upper_fraction}: one side would be empty")
    return sorted(perm[n_upper:]), sorted(perm[:n_upper])


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so different streams/epochs/positions never share a seed."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


@contextmanager
def seeded_rng(seed: int, device: torch.device | str = "cpu"):
    """Run the body with the global RNG (CPU, and the current CUDA device) seeded, then restore it: the body's
    dropout masks (or a collator's random choices) are a function of ``seed``, and the caller's RNG stream is as if
    the body never ran."""
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield


class BatchStream:
    """Endless, seeded, epoch-shuffled batches over ``indices`` of ``dataset``; resumable at ``(epoch, position)``.

    Each epoch is a fresh ``torch.randperm`` from a generator seeded with ``(seed, epoch)``. Under data parallelism
    every global batch of ``batch_size · world_size`` items is cut into one slice per rank; the incomplete last global
    batch of an epoch is dropped so all ranks take the same number of steps. Each batch also carries a seed (for the
    dropout masks of every evaluation of that batch), a function of ``(seed, epoch, position, rank)`` only. The
    collator runs under that seed too, so a random collator neither depends on nor moves the global RNG.

    Raises:
        ValueError: fewer examples than one global batch.
        TypeError: a collator that does not return a mapping.
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: Sequence[int],
        batch_size: int,
        collate_fn: Callable,
        seed: int,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.dataset, self.indices = dataset, list(indices)
        self.batch_size, self.collate_fn, self.seed = batch_size, collate_fn, seed
        self.device, self.rank, self.world_size = torch.device(device), rank, world_size
        if len(self.indices) < batch_size * world_size:
            raise ValueError(
                f"{len(self.indices)} examples cannot fill one batch of {batch_size} x {world_size} process(es); "
                "lower the batch size or use more data"
            )
        self.epoch, self.position = 0, 0
        self._iterator: Iterator | None = None
        self.batch_seed = 0

    def __len__(self) -> int:
        """Batches per epoch (per rank)."""
        return len(self.indices) // (self.batch_size * self.world_size)

    def _epoch_batches(self) -> list[list[int]]:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.indices), generator=gen).tolist()
        span = self.batch_size * self.world_size
        start = self.rank * self.batch_size
        return [
            [self.indices[i] for i in order[b * span + start : b * span + start + self.batch_size]]
            for b in range(len(self))
        ]

    def next(self) -> dict:
        """The next batch as a dict of tensors on ``device``; sets :attr:`batch_seed`."""
        if self.position >= len(self):
            self.epoch, self.position, self._iterator = self.epoch + 1, 0, None
        if self._iterator is None:
            self._iterator = iter(self._epoch_batches()[self.position :])
        self.batch_seed = mix_seed(self.seed, 0x5EED, self.epoch, self.position, self.rank)
        with seeded_rng(self.batch_seed):
            batch = self.collate_fn([self.dataset[i] for i in next(self._iterator)])
        if not isinstance(batch, Mapping):
            raise TypeError(f"collate_fn must return a mapping of tensors (e.g. a dict), got {type(batch).__name__}")
        self.position += 1
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._iterator = int(state["epoch"]), int(state["position"]), None

