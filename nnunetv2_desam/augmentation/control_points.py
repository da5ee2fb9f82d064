"""Smooth fields from a coarse grid of control points (uniform B-spline interpolation), 2d and 3d.

AdvBias's bias field and CSDG's blending mask are both such fields (CSDG's authors reuse Chen et al.'s
control-point code): a few control points per axis, interpolated by a uniform B-spline on a grid
``downscale`` times coarser than the patch, then resized linearly to the patch.
"""

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F


def bspline_kernel_1d(spacing: int, order: int) -> torch.Tensor:
    """The uniform B-spline of degree ``order`` sampled ``spacing`` times per knot interval, length (order+1)·spacing−order.

    A box of width ``spacing`` convolved ``order`` times with normalised boxes: copies shifted by ``spacing``
    sum to one (partition of unity), so constant control points give a constant field.
    """
    kernel = torch.ones(1, 1, spacing, dtype=torch.float64)
    box = torch.full((1, 1, spacing), 1.0 / spacing, dtype=torch.float64)
    for _ in range(order):
        kernel = F.conv1d(kernel, box, padding=spacing - 1)
    return kernel[0, 0]


@dataclass(frozen=True)
class ControlPointGrid:
    """Where the control points of a field over a patch of ``size`` voxels sit.

    ``spacing`` is in voxels of the patch; the B-spline runs on a grid ``downscale`` times coarser (the
    authors' memory saving) and there are just enough control points for the spline to be complete
    (partition of unity) over the whole patch.
    """

    size: Tuple[int, ...]
    spacing: Tuple[int, ...]
    order: int
    downscale: int

    @classmethod
    def fraction_of_patch(cls, size: Sequence[int], fraction: float, order: int, downscale: int) -> "ControlPointGrid":
        """Control points ``fraction`` of the patch apart along every axis."""
        size = tuple(int(s) for s in size)
        return cls(size, tuple(max(1, round(s * fraction)) for s in size), order, downscale)

    @property
    def coarse_size(self) -> Tuple[int, ...]:
        return tuple(max(1, math.ceil(s / self.downscale)) for s in self.size)

    @property
    def coarse_spacing(self) -> Tuple[int, ...]:
        return tuple(max(1, s // self.downscale) for s in self.spacing)

    @property
    def shape(self) -> Tuple[int, ...]:
        """Control points per axis."""
        return tuple(math.ceil(n / s) + self.order for n, s in zip(self.coarse_size, self.coarse_spacing))

    def points_shape(self, batch: int) -> Tuple[int, ...]:
        """Shape of one scalar field's control points for a batch: B×1×n1×n2(×n3)."""
        return (batch, 1, *self.shape)


def interpolate_control_points(points: torch.Tensor, grid: ControlPointGrid) -> torch.Tensor:
    """B-spline field of control points ``points`` (B×1×n1×n2[×n3], ``grid.points_shape``) → B×1×``grid.size``."""
    kernel = torch.ones((), dtype=torch.float64)
    for spacing in grid.coarse_spacing:
        kernel = kernel[..., None] * bspline_kernel_1d(spacing, grid.order)
    kernel = kernel.to(points)[None, None]
    transposed = F.conv_transpose2d if len(grid.size) == 2 else F.conv_transpose3d
    dense = transposed(points, kernel, stride=grid.coarse_spacing)
    crop = []
    for axis, (points_per_axis, spacing, length) in enumerate(zip(grid.shape, grid.coarse_spacing, grid.coarse_size)):
        first_complete = kernel.shape[2 + axis] - spacing  # voxels before it miss a control point's contribution
        complete = points_per_axis * spacing - first_complete
        start = first_complete + (complete - length) // 2
        crop.append(slice(start, start + length))
    field = dense[(slice(None), slice(None), *crop)]
    if tuple(field.shape[2:]) != grid.size:
        field = F.interpolate(field, size=grid.size, mode="bilinear" if len(grid.size) == 2 else "trilinear", align_corners=False)
    return field

