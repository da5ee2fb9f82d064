"""Random draws for the augmentations: made on the CPU, so that a seeded CPU ``torch.Generator`` gives the same
augmentation on any device (tests pass one; trainers use torch's global generator), then moved to the batch's device."""

from typing import Optional, Sequence

import torch


def uniform(shape: Sequence[int], low: float, high: float, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniform samples in [low, high)."""
    return (low + (high - low) * torch.rand(tuple(shape), generator=generator)).to(device)


def normal(shape: Sequence[int], std: float, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """N(0, std²) samples."""
    return (std * torch.randn(tuple(shape), generator=generator)).to(device)


def integer(high: int, generator: Optional[torch.Generator] = None) -> int:
    """A uniform integer in [0, high)."""
    return int(torch.randint(high, (1,), generator=generator))
