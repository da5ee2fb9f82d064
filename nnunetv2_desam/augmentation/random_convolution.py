"""Random convolutions (RandConv; Xu et al., ICLR 2021; ``wildphoton/RandConv``), 2d and 3d.

Each view of the batch is one convolution with a fresh random kernel shared by the whole batch — size drawn
from {1, 3, 5, 7}, weights Kaiming-normal N(0, 1/(C·k^d)), no bias, zero padding — mixed with the input,
α·conv(x) + (1−α)·x with α ~ U(0, 1) drawn per view. Training uses three such views: the segmentation loss on
the first, and their consistency loss, λ = 10 (the "RC_mix" setting with consistency in ``exp_mnist10k.sh``,
which ``lib/networks/rand_conv.py`` implements and ``randconv_trainer.py`` trains; λ = 10 is also what
MaxStyle's and CSDG's authors use for it in segmentation).

Intensity range: RandConv convolves whitened (dataset mean/std normalised) images without clamping, which
nnU-Net's z-scored batch already is, so it is used as is.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from nnunetv2_desam.augmentation.sampling import integer, normal, uniform


@dataclass(frozen=True)
class RandConvSettings:
    kernel_sizes: Tuple[int, ...] = (1, 3, 5, 7)
    views: int = 3
    consistency_weight: float = 10.0


def random_kernel(channels: int, dims: int, kernel_sizes: Sequence[int], device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A C×C×k×k(×k) kernel: size drawn from ``kernel_sizes``, weights N(0, 1/(C·k^dims)) (Kaiming normal, gain 1)."""
    size = kernel_sizes[integer(len(kernel_sizes), generator)]
    fan_in = channels * size ** dims
    return normal((channels, channels, *[size] * dims), fan_in ** -0.5, device, generator)


def random_convolution(data: torch.Tensor, kernel_sizes: Sequence[int] = RandConvSettings.kernel_sizes,
                       generator: Optional[torch.Generator] = None):
    """One RandConv view of ``data`` (B×C×spatial): returns (α·conv(x, K) + (1−α)·x, K, α) for a random K and α."""
    dims = data.ndim - 2
    kernel = random_kernel(data.shape[1], dims, kernel_sizes, data.device, generator)
    alpha = float(uniform((), 0.0, 1.0, "cpu", generator))
    convolve = F.conv2d if dims == 2 else F.conv3d
    convolved = convolve(data, kernel.to(data.dtype), padding=kernel.shape[-1] // 2)
    return alpha * convolved + (1 - alpha) * data, kernel, alpha


def randconv_views(data: torch.Tensor, settings: RandConvSettings = RandConvSettings(), generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``settings.views`` independent RandConv views of the batch, stacked view-major: (V·B)×C×spatial."""
    return torch.cat([random_convolution(data, settings.kernel_sizes, generator)[0] for _ in range(settings.views)])


def js_consistency(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """RandConv's consistency: the mean over views of KL(p_i ‖ p̄), p̄ the views' mean probability (clamped at 1e-7).

    Per voxel, summed over classes and averaged over voxels (MaxStyle's authors' segmentation form of
    RandConv's per-image 'batchmean'). ``logits``: one B×K×spatial tensor per view.
    """
    probabilities = [torch.softmax(view.float(), 1) for view in logits]
    log_mean = torch.log(torch.clamp(sum(probabilities) / len(probabilities), 1e-7, 1))
    divergences = [(torch.xlogy(p, p) - p * log_mean).sum(1).mean() for p in probabilities]
    return sum(divergences) / len(divergences)
