"""Automatic prompts for inference and random point prompts for training.

Coordinates are (x, y) = (column, row) in pixels of the image they refer to, as in SAM.
"""

from typing import NamedTuple, Optional, Tuple

import torch
from segment_anything.utils.amg import build_point_grid


def grid_points(points_per_side: int, image_size: Tuple[int, int]) -> torch.Tensor:
    """SAM's automatic grid (``build_point_grid``: the centres of an N×N tiling, row by row) scaled to
    an H×W image. Returns N²×2 (x, y), float32."""
    height, width = image_size
    return torch.from_numpy(build_point_grid(points_per_side) * [width, height]).float()


class TrainingPrompts(NamedTuple):
    """One point prompt per sample and what it teaches the IoU head.

    points: B×1×2 (x, y) at pixel centres; iou_target: B×(K-1), 1.0 where the point lies in that
    class; supervised: B×(K-1), 1.0 for the one IoU output each point trains (the chosen class; none in a
    patch without foreground).
    """

    points: torch.Tensor
    iou_target: torch.Tensor
    supervised: torch.Tensor


def sample_training_points(
    target: torch.Tensor,
    num_foreground_classes: int,
    generator: torch.Generator,
    ignore_label: Optional[int] = None,
) -> TrainingPrompts:
    """One point per sample that gives every class's IoU output balanced targets.

    Per sample, a class c is chosen uniformly among the foreground classes present in the patch,
    then a point inside c or outside it with equal probability; the point trains class c's IoU
    output only, towards 1 inside and 0 outside. So each output sees as many positives as negatives,
    whatever its class's size and however many classes the task has. A patch without foreground
    (nnU-Net samples many) still gets a point, for the mask loss, but trains no IoU output: as
    negatives those patches would pull every output's base rate under the gate's 0.5 (the authors
    train on foreground slices only). With one foreground class this is the authors' recipe:
    inside or outside the foreground, 1:1.

    DeSAM's grid-points training: the mask target stays the whole ground truth wherever the point
    lands; only the IoU head learns whether the point hits an object.

    Args:
        target: label maps B×1×H×W (or B×H×W), integer valued, on the CPU.
        num_foreground_classes: K-1, the number of IoU outputs.
        generator: a CPU ``torch.Generator``; the draw is a function of its state.
        ignore_label: voxels with this label are never chosen.
    """
    labels = target.reshape(target.shape[0], -1).long()
    height, width = target.shape[-2:]
    valid = labels != ignore_label if ignore_label is not None else torch.ones_like(labels, dtype=torch.bool)
    classes = torch.arange(1, num_foreground_classes + 1)
    present = ((labels[:, None, :] == classes[None, :, None]) & valid[:, None, :]).any(dim=2)  # B×(K-1)
    has_foreground = present.any(dim=1, keepdim=True)  # B×1
    present = torch.where(has_foreground, present, torch.ones_like(present))
    chosen = torch.multinomial(present.float(), 1, generator=generator)  # B×1, index into classes
    in_class = (labels == chosen + 1) & valid
    want_inside = torch.rand(labels.shape[0], generator=generator) < 0.5
    pool = torch.where(want_inside[:, None], in_class, ~in_class & valid)
    fallback = torch.where(want_inside[:, None], ~in_class & valid, in_class)
    pool = torch.where(pool.any(dim=1, keepdim=True), pool, fallback)
    pool = torch.where(pool.any(dim=1, keepdim=True), pool, torch.ones_like(pool))
    index = torch.multinomial(pool.float(), 1, generator=generator).squeeze(1)
    rows, cols = index // width, index % width
    points = torch.stack([cols, rows], dim=-1).float()[:, None, :] + 0.5
    hit = labels.gather(1, index[:, None])
    supervised = torch.zeros(labels.shape[0], num_foreground_classes).scatter_(1, chosen, 1.0) * has_foreground
    return TrainingPrompts(points, (hit == classes[None]).float(), supervised)


def iou_loss_per_class(iou: torch.Tensor, prompts: TrainingPrompts) -> torch.Tensor:
    """Σ_k MSE_k: each class's IoU output (iou B×(K-1)) regressed on the samples whose point supervises it.

    Summed, not averaged, over the K-1 outputs, so that a weight of 10 is the paper's 10·MSE per class
    however many classes there are (binary: the paper's loss exactly). A class that no sample of the
    batch supervises adds nothing.
    """
    supervised = prompts.supervised.to(iou.device)
    squared_error = (iou.float() - prompts.iou_target.to(iou.device)) ** 2
    return ((supervised * squared_error).sum(0) / supervised.sum(0).clamp_min(1.0)).sum()
