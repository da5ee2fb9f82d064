"""Automatic prompts for inference and random point prompts for training.

Coordinates are (x, y) = (column, row) in pixels of the image they refer to, as in SAM.
"""

from typing import Optional, Tuple

import torch
from segment_anything.utils.amg import build_point_grid


def grid_points(points_per_side: int, image_size: Tuple[int, int]) -> torch.Tensor:
    """SAM's automatic grid (``build_point_grid``: the centres of an N×N tiling, row by row) scaled to
    an H×W image. Returns N²×2 (x, y), float32."""
    height, width = image_size
    return torch.from_numpy(build_point_grid(points_per_side) * [width, height]).float()


def sample_training_points(
    target: torch.Tensor,
    num_foreground_classes: int,
    generator: torch.Generator,
    ignore_label: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One point per sample, inside the foreground or outside it with equal probability.

    DeSAM's grid-points training: the mask target stays the whole ground truth wherever the point
    lands; only the IoU head learns whether the point hits an object.

    Args:
        target: label maps B×1×H×W (or B×H×W), integer valued, on the CPU.
        num_foreground_classes: K-1, the number of IoU outputs.
        generator: a CPU ``torch.Generator``; the draw is a function of its state.
        ignore_label: voxels with this label are never chosen.
    Returns:
        points B×1×2 (x, y) at pixel centres, float32; IoU targets B×(K-1), 1.0 where the point
        lies in that class, else 0.0.
    """
    labels = target.reshape(target.shape[0], -1).long()
    height, width = target.shape[-2:]
    valid = labels != ignore_label if ignore_label is not None else torch.ones_like(labels, dtype=torch.bool)
    foreground = (labels > 0) & valid
    background = (labels == 0) & valid
    want_foreground = torch.rand(labels.shape[0], generator=generator) < 0.5
    pool = torch.where(want_foreground[:, None], foreground, background)
    fallback = torch.where(want_foreground[:, None], background, foreground)
    pool = torch.where(pool.any(dim=1, keepdim=True), pool, fallback)
    pool = torch.where(pool.any(dim=1, keepdim=True), pool, torch.ones_like(pool))
    index = torch.multinomial(pool.float(), 1, generator=generator).squeeze(1)
    rows, cols = index // width, index % width
    points = torch.stack([cols, rows], dim=-1).float()[:, None, :] + 0.5
    hit = labels.gather(1, index[:, None])
    classes = torch.arange(1, num_foreground_classes + 1)
    return points, (hit == classes[None]).float()
