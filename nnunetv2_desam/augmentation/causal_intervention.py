"""CSDG: global intensity non-linear augmentation (GIN) and interventional pseudo-correlation augmentation (IPA).

Ouyang et al., TMI 2022, ``cheng-01037/Causality-Medical-Image-Domain-Generalization``. Settings from
``configs_exp.py``, ``models/imagefilter.py`` (2d GIN), ``models/imagefilter3d.py`` (3d GIN),
``models/exp_trainer.py`` and ``biasfield_interpolate_cchen/adv_bias.py`` (the IPA mask):

- GIN: a random shallow network per sample — 4 convolutions (C→2→2→2→C channels), each with its own kernel
  size drawn from {1, 3} per layer, weights and bias N(0, 1), leaky ReLU after all but the last — mixed with
  the input, α·GIN(x) + (1−α)·x, α ~ U(0, 1) per sample, then rescaled to the input's Frobenius norm.
- IPA: three GIN copies g1, g2, g3 of the batch; a random smooth mask m in [0, 1] per sample (control points
  N(0, 1), L2-normalised per sample, B-spline of order 2 a quarter of the image apart on a grid downscaled 2×,
  exp, min-max to [0, 1]) blends the first two: g1·m + g2·(1−m) and g1·(1−m) + g2·m.
- Loss: segmentation on the first (blended) copy, plus 10 × KL(p̄ ‖ p_i) over the three copies, p̄ their mean
  probability, averaged over every element (PyTorch's ``KLDivLoss()`` default) as the authors compute it.

Intensity range: the authors z-score their images (CT with dataset statistics, MR per volume), as nnU-Net's
batch is, and GIN's Frobenius rescaling keeps the z-scored energy; so the batch is used as is. 3d: GIN is
the authors' 3d version; IPA's mask is the same B-spline field in 3d (their 3d IPA was not released).
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from nnunetv2_desam.augmentation.control_points import ControlPointGrid, interpolate_control_points
from nnunetv2_desam.augmentation.sampling import integer, normal, uniform


@dataclass(frozen=True)
class CSDGSettings:
    layers: int = 4
    hidden_channels: int = 2
    kernel_sizes: Tuple[int, ...] = (1, 3)
    mask_spacing_fraction: float = 0.25  # 24 coarse voxels at downscale 2 on the authors' 192² images
    mask_order: int = 2
    mask_downscale: int = 2
    consistency_weight: float = 10.0


def random_shallow_network(data: torch.Tensor, settings: CSDGSettings = CSDGSettings(), generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """GIN's random network applied to ``data`` (B×C×spatial), a different network per sample; B×C×spatial.

    The samples run as groups of one grouped convolution, as in the authors' implementation.
    """
    batch, channels, *spatial = data.shape
    convolve = F.conv2d if len(spatial) == 2 else F.conv3d
    widths = [channels] + [settings.hidden_channels] * (settings.layers - 1) + [channels]
    x = data.reshape(1, batch * channels, *spatial)
    for layer, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        size = settings.kernel_sizes[integer(len(settings.kernel_sizes), generator)]
        kernel = normal((batch * width_out, width_in, *[size] * len(spatial)), 1.0, data.device, generator).to(data.dtype)
        shift = normal((batch * width_out,), 1.0, data.device, generator).to(data.dtype)
        x = convolve(x, kernel, shift, padding=size // 2, groups=batch)
        if layer < settings.layers - 1:
            x = F.leaky_relu(x)
    return x.reshape(batch, channels, *spatial)


def global_intensity_nonlinear(data: torch.Tensor, settings: CSDGSettings = CSDGSettings(), generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One GIN copy of ``data`` (B×C×spatial): random network mixed with the input, at the input's Frobenius norm."""
    shape = (data.shape[0],) + (1,) * (data.ndim - 1)
    alpha = uniform(shape, 0.0, 1.0, data.device, generator).to(data.dtype)
    mixed = alpha * random_shallow_network(data, settings, generator) + (1 - alpha) * data
    norm_in = data.flatten(1).norm(dim=1).view(shape)
    norm_out = mixed.flatten(1).norm(dim=1).view(shape)
    return mixed * norm_in / (norm_out + 1e-5)


def blending_mask(batch: int, spatial_size: Sequence[int], settings: CSDGSettings = CSDGSettings(), device="cpu",
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """IPA's random smooth mask B×1×spatial, each sample's ranging over exactly [0, 1]."""
    grid = ControlPointGrid.fraction_of_patch(spatial_size, settings.mask_spacing_fraction, settings.mask_order, settings.mask_downscale)
    points = normal(grid.points_shape(batch), 1.0, device, generator)
    points = points / points.flatten(1).norm(dim=1).view(-1, *[1] * (points.ndim - 1))
    field = torch.exp(interpolate_control_points(points, grid)).flatten(1)
    low, high = field.amin(1, keepdim=True), field.amax(1, keepdim=True)
    return ((field - low) / (high - low + 1e-20)).view(batch, 1, *spatial_size)


def gin_ipa_views(data: torch.Tensor, settings: CSDGSettings = CSDGSettings(), generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The three training copies of the batch B×C×spatial, view-major (3·B)×C×spatial: two IPA blends and one GIN copy."""
    first, second, third = (global_intensity_nonlinear(data, settings, generator) for _ in range(3))
    mask = blending_mask(data.shape[0], data.shape[2:], settings, data.device, generator).to(data.dtype)
    return torch.cat([first * mask + second * (1 - mask), first * (1 - mask) + second * mask, third])


def kl_from_mean_consistency(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """CSDG's consistency: KL(p̄ ‖ p_i) for each view i, averaged over every element (views, batch, classes, voxels).

    ``logits``: one B×K×spatial tensor per view; p̄ is the views' mean probability.
    """
    log_probabilities = [torch.log_softmax(view.float(), 1) for view in logits]
    mean = sum(torch.exp(log_p) for log_p in log_probabilities) / len(log_probabilities)
    return sum((torch.xlogy(mean, mean) - mean * log_p).mean() for log_p in log_probabilities) / len(log_probabilities)
