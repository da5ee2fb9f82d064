"""Adversarial bias field (AdvBias; Chen et al., MICCAI 2020; ``cherise215/advchain``), 2d and 3d.

A smooth multiplicative field ``exp(B-spline(control points))`` clipped to [1−ε, 1+ε], whose control points
take one normalised gradient-ascent step that makes the network's prediction on the biased batch differ most
from its prediction on the clean batch (KL + 0.5·contour divergence), then are clipped to [log(1−ε), log(1+ε)].

Settings are advchain's (``advchain/augmentor/adv_bias.py``, README example, ``adv_compose_solver.py``):
ε = 0.3, control points every half patch, B-spline of order 3 on a grid downscaled 2×, uniform random
initialisation in log space, one step of size 1 (projected gradient ascent, no power iteration),
divergence KL + 0.5·contour, consistency weight 1 in supervised training.

Intensity range: the authors' images are min-max normalised to [0, 1], where a multiplicative field
brightens or darkens tissue. nnU-Net's batch is z-scored (zero mean), so each sample and channel is
mapped to [0, 1] by its own minimum and maximum, multiplied by the field and mapped back: the field
scales the distance from the patch's minimum, as it scales intensity above background in an MR image.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from nnunetv2_desam.augmentation.control_points import ControlPointGrid, interpolate_control_points
from nnunetv2_desam.augmentation.sampling import uniform


@dataclass(frozen=True)
class BiasFieldSettings:
    magnitude: float = 0.3  # ε: the field stays within [1 − ε, 1 + ε]
    spacing_fraction: float = 0.5  # control points every half patch ([h//2, w//2] in advchain)
    order: int = 3
    downscale: int = 2
    steps: int = 1
    step_size: float = 1.0
    contour_weight: float = 0.5
    consistency_weight: float = 1.0

    @property
    def log_bounds(self):
        return math.log(1 - self.magnitude), math.log(1 + self.magnitude)

    def grid(self, spatial_size) -> ControlPointGrid:
        return ControlPointGrid.fraction_of_patch(spatial_size, self.spacing_fraction, self.order, self.downscale)


def random_control_points(batch: int, grid: ControlPointGrid, settings: BiasFieldSettings, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Log-space control points B×1×n1×n2(×n3), uniform in [log(1−ε), log(1+ε)] (advchain's 'random' initialisation)."""
    return uniform(grid.points_shape(batch), *settings.log_bounds, device=device, generator=generator)


def bias_field(points: torch.Tensor, grid: ControlPointGrid, settings: BiasFieldSettings) -> torch.Tensor:
    """The multiplicative field B×1×spatial: exp of the interpolated control points, clipped to [1−ε, 1+ε]."""
    field = torch.exp(interpolate_control_points(points, grid))
    return field.clamp(1 - settings.magnitude, 1 + settings.magnitude)


def apply_bias_field(data: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """``data`` (B×C×spatial, z-scored) with ``field`` (B×1×spatial) applied above each sample's and channel's minimum.

    The same as mapping every sample and channel to [0, 1] by its minimum and maximum, multiplying by the field
    and mapping back.
    """
    flat = data.flatten(2)
    low = flat.amin(-1).view(*data.shape[:2], *[1] * (data.ndim - 2))
    return low + field * (data - low)


def sobel_gradients(probabilities: torch.Tensor):
    """Sobel derivatives of each channel of B×K×spatial along every spatial axis (a list, one per axis)."""
    dims = probabilities.ndim - 2
    derivative = probabilities.new_tensor([1.0, 0.0, -1.0])
    smoothing = probabilities.new_tensor([1.0, 2.0, 1.0])
    convolve = F.conv2d if dims == 2 else F.conv3d
    channels = probabilities.shape[1]
    gradients = []
    for axis in range(dims):
        kernel = torch.ones((), dtype=probabilities.dtype, device=probabilities.device)
        for other in range(dims):
            kernel = kernel[..., None] * (derivative if other == axis else smoothing)
        kernel = kernel.expand(channels, 1, *kernel.shape).contiguous()
        gradients.append(convolve(probabilities, kernel, padding=1, groups=channels))
    return gradients


def bias_divergence(clean_logits: torch.Tensor, perturbed_logits: torch.Tensor, contour_weight: float) -> torch.Tensor:
    """advchain's divergence between the predictions on the clean and the biased batch (logits B×K×spatial).

    KL(p_clean ‖ p_biased) summed over classes and averaged over voxels, plus ``contour_weight`` times the mean
    squared difference of the Sobel edges of the foreground probabilities (their contour loss). The clean
    prediction is the reference and carries no gradient.
    """
    clean_logits, perturbed_logits = clean_logits.detach().float(), perturbed_logits.float()
    p = torch.softmax(clean_logits, 1)
    kl = (p * (torch.log_softmax(clean_logits, 1) - torch.log_softmax(perturbed_logits, 1))).sum(1).mean()
    clean_edges = sobel_gradients(p[:, 1:])
    perturbed_edges = sobel_gradients(torch.softmax(perturbed_logits, 1)[:, 1:])
    contour = sum(F.mse_loss(e, c) for e, c in zip(perturbed_edges, clean_edges)) / len(clean_edges)
    return kl + contour_weight * contour


def clean_vs_biased_consistency(logits, contour_weight: float = BiasFieldSettings.contour_weight) -> torch.Tensor:
    """The training consistency term: ``bias_divergence`` between the clean view (first) and the biased view (second)."""
    clean, biased = logits
    return bias_divergence(clean, biased, contour_weight)


def full_resolution(output):
    """The full-resolution logits of a network output (nnU-Net returns a list under deep supervision)."""
    return output[0] if isinstance(output, (list, tuple)) else output


def optimise_control_points(network: Callable, data: torch.Tensor, points: torch.Tensor, grid: ControlPointGrid,
                            settings: BiasFieldSettings, scale_loss: Callable = lambda loss: loss) -> torch.Tensor:
    """``settings.steps`` steps of projected gradient ascent of ``bias_divergence`` on the control points.

    Each step moves every sample's control points by ``step_size`` along its L2-normalised gradient and clips
    them to the log bounds. Only the points receive gradients (the network's stay untouched); ``scale_loss``
    is nnU-Net's grad scaler under mixed precision (the normalisation cancels the scale). A step whose
    gradient is not finite is skipped, as advchain skips a non-finite divergence.
    """
    with torch.no_grad():
        clean = full_resolution(network(data))
    low, high = settings.log_bounds
    for _ in range(settings.steps):
        points = points.detach().requires_grad_(True)
        biased = apply_bias_field(data, bias_field(points, grid, settings))
        divergence = bias_divergence(clean, full_resolution(network(biased)), settings.contour_weight)
        (gradient,) = torch.autograd.grad(scale_loss(divergence), points)
        if not torch.isfinite(gradient).all():
            break
        norm = gradient.flatten(1).norm(dim=1).view(-1, *[1] * (gradient.ndim - 1))
        points = (points + settings.step_size * gradient / (norm + 1e-20)).clamp(low, high)
    return points.detach()


def adversarial_bias(network: Callable, data: torch.Tensor, settings: BiasFieldSettings = BiasFieldSettings(),
                     scale_loss: Callable = lambda loss: loss, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The batch B×C×spatial under its adversarial bias field (detached)."""
    grid = settings.grid(data.shape[2:])
    points = random_control_points(data.shape[0], grid, settings, data.device, generator)
    points = optimise_control_points(network, data, points, grid, settings, scale_loss)
    with torch.no_grad():
        return apply_bias_field(data, bias_field(points, grid, settings))
