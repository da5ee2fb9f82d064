"""MaxStyle (Chen et al., MICCAI 2022; ``cherise215/MaxStyle``): adversarial style composition, 2d and 3d.

An auxiliary image decoder (``nnunetv2_desam.networks.image_decoder``) reconstructs the batch from the
encoder's bottleneck; MaxStyle layers in that decoder re-style its feature maps — per-sample, per-channel
statistics mixed with another sample's and perturbed by noise — and the mixing weights and noise are
optimised with Adam to *raise* the segmentation loss of the stylised images. The segmentation network is
then trained on them. Settings from ``src/advanced/maxstyle.py``, ``config/*/MICCAI2022_MaxStyle.json`` and
``generate_max_style_image`` in ``src/models/advanced_triplet_recon_segmentation_model.py``: layers after
the last two decoder blocks and on the output image (``decoder_layers_indexes`` [3, 4, 5]), each active with
p = 0.5, mixing λ ~ U(0, 1) and noise ε_γ, ε_β ~ N(0, 1) all learnable, a random non-identity batch
permutation, Adam lr 0.1 for 5 steps. 3d: statistics over all spatial axes (the authors' code is 2d).

Intensity range: the authors' z-score configuration re-normalises a stylised image per image before
training on it, the way clean inputs are normalised; nnU-Net's clean patches are z-scored per case, so a
stylised image is given its clean patch's per-channel mean and standard deviation.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import nn

from nnunetv2_desam.augmentation.sampling import normal, uniform
from nnunetv2_desam.networks.image_decoder import ImageDecoder


@dataclass(frozen=True)
class MaxStyleSettings:
    probability: float = 0.5
    steps: int = 5
    learning_rate: float = 0.1
    styled_stages: int = 2  # the last decoder stages that get a style layer; the output image always does
    input_noise_std: float = 0.05  # their denoising input noise for the standard branch
    eps: float = 1e-6


def channel_statistics(x: torch.Tensor, eps: float):
    """Per-sample, per-channel mean and standard deviation of B×C×spatial, shaped B×C×1…; computed in float32."""
    dims = tuple(range(2, x.ndim))
    x = x.float()
    return x.mean(dims, keepdim=True), (x.var(dims, keepdim=True) + eps).sqrt()


def random_derangement_of_batch(batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random permutation of 0 … batch−1 other than the identity (batch ≥ 2)."""
    while True:
        permutation = torch.randperm(batch, generator=generator)
        if not torch.equal(permutation, torch.arange(batch)):
            return permutation


class StyleComposition(nn.Module):
    """One MaxStyle layer on a feature map B×C×spatial.

    x ↦ σ'·(x − μ)/σ + μ', with μ, σ the per-sample, per-channel mean and standard deviation (no gradient) and
    σ' = (1−λ)σ + λσ[π] + ε_γ·std_B(σ),   μ' = (1−λ)μ + λμ[π] + ε_β·std_B(μ),
    λ = clamp(mixing, 0, 1) per sample, π a random non-identity permutation of the batch, ε_γ, ε_β per sample and
    channel, std_B the spread over the batch of the first feature map seen. Active with probability ``p``;
    an inactive layer (or a batch of one) passes x through and has no parameters.
    """

    def __init__(self, batch: int, channels: int, settings: MaxStyleSettings, device, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.eps = settings.eps
        self.active = batch > 1 and float(uniform((), 0.0, 1.0, "cpu", generator)) < settings.probability
        if self.active:
            self.mixing = nn.Parameter(uniform((batch, 1), 0.0, 1.0, device, generator))
            self.gamma_noise = nn.Parameter(normal((batch, channels), 1.0, device, generator))
            self.beta_noise = nn.Parameter(normal((batch, channels), 1.0, device, generator))
            self.permutation = random_derangement_of_batch(batch, generator).to(device)
        self.noise_scale = None

    def target_statistics(self, mean: torch.Tensor, std: torch.Tensor):
        """(μ', σ') for the statistics (μ, σ) of a feature map, both B×C×1…"""
        if self.noise_scale is None:
            self.noise_scale = (std.std(0, keepdim=True), mean.std(0, keepdim=True))
        shape = (*mean.shape[:2], *[1] * (mean.ndim - 2))
        mixing = self.mixing.clamp(0, 1).view(shape[0], 1, *shape[2:])
        mixed_std = (1 - mixing) * std + mixing * std[self.permutation]
        mixed_mean = (1 - mixing) * mean + mixing * mean[self.permutation]
        return (mixed_mean + self.beta_noise.view(shape) * self.noise_scale[1],
                mixed_std + self.gamma_noise.view(shape) * self.noise_scale[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        mean, std = channel_statistics(x.detach(), self.eps)
        new_mean, new_std = self.target_statistics(mean, std)
        return ((x.float() - mean) / std * new_std + new_mean).to(x.dtype)


def restyle_like(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``images`` (B×C×spatial) shifted and scaled to ``reference``'s per-sample, per-channel mean and std."""
    mean, std = channel_statistics(images, 0.0)
    reference_mean, reference_std = channel_statistics(reference, 0.0)
    return ((images.float() - mean) / (std + 1e-8) * reference_std + reference_mean).to(images.dtype)


def style_layers(decoder: ImageDecoder, batch: int, settings: MaxStyleSettings, device, generator: Optional[torch.Generator] = None) -> Dict[int, StyleComposition]:
    """Fresh MaxStyle layers at the decoder's last ``styled_stages`` stages and its output, keyed by style position."""
    channels = decoder.position_channels()
    output = len(channels) - 1
    positions = list(range(max(0, output - settings.styled_stages), output)) + [output]
    return {p: StyleComposition(batch, channels[p], settings, device, generator) for p in positions}


def stylised_images(decoder: ImageDecoder, bottleneck: torch.Tensor, styles, clean: torch.Tensor) -> torch.Tensor:
    """The decoder's image of ``bottleneck`` under ``styles``, with the clean batch's channel statistics."""
    return restyle_like(decoder(bottleneck, styles), clean)


def search_styles(decoder: ImageDecoder, bottleneck: torch.Tensor, segmentation_loss: Callable[[torch.Tensor], torch.Tensor],
                  clean: torch.Tensor, settings: MaxStyleSettings = MaxStyleSettings(),
                  scale_loss: Callable = lambda loss: loss, generator: Optional[torch.Generator] = None) -> Dict[int, StyleComposition]:
    """MaxStyle's inner loop: Adam on the style parameters, maximising ``segmentation_loss`` of the stylised images.

    Only the style parameters receive gradients (decoder and segmentation network stay untouched).
    ``scale_loss`` is nnU-Net's grad scaler under mixed precision (Adam is invariant to the scale); the
    search stops at a non-finite gradient.
    """
    styles = style_layers(decoder, clean.shape[0], settings, clean.device, generator)
    parameters = [p for layer in styles.values() for p in layer.parameters()]
    if not parameters:
        return styles
    optimizer = torch.optim.Adam(parameters, lr=settings.learning_rate)
    for _ in range(settings.steps):
        loss = -segmentation_loss(stylised_images(decoder, bottleneck, styles, clean))
        gradients = torch.autograd.grad(scale_loss(loss), parameters, allow_unused=True)
        if not all(g is None or torch.isfinite(g).all() for g in gradients):
            break
        for parameter, gradient in zip(parameters, gradients):
            parameter.grad = torch.zeros_like(parameter) if gradient is None else gradient
        optimizer.step()
    return styles


def maxstyle_images(decoder: ImageDecoder, bottleneck: torch.Tensor, segmentation_loss: Callable[[torch.Tensor], torch.Tensor],
                    clean: torch.Tensor, settings: MaxStyleSettings = MaxStyleSettings(),
                    scale_loss: Callable = lambda loss: loss, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Adversarially stylised images B×C×spatial (detached) from the bottleneck features of the (noisy) clean batch."""
    styles = search_styles(decoder, bottleneck.detach(), segmentation_loss, clean, settings, scale_loss, generator)
    with torch.no_grad():
        return stylised_images(decoder, bottleneck, styles, clean)
