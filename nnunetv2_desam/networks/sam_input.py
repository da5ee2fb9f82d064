"""From an nnU-Net patch to SAM's encoder input, and from the encoder's grid back to the patch.

nnU-Net hands the network patches of its per-case normalised intensities (z-scores; for CT
channels clipped to the dataset's foreground percentiles first). :class:`SAMInput` turns them
into what SAM was trained on:

1. **Intensities.** A fixed window of nnU-Net's normalised units per channel maps linearly to
   SAM's 0–255 (clipped). The map is the same for every patch, so every tile and slice of a case
   is mapped identically (nnU-Net normalised the case once) and nnU-Net's brightness, contrast
   and gamma augmentations reach the encoder. The window follows the channel's nnU-Net scheme
   (:func:`intensity_windows`): z-scored channels get ``ZSCORE_WINDOW`` = [-1, 4.5], the narrowest
   window in half units that holds the 0.5 and 99.5 percentiles (the authors' per-volume window)
   of every real abdominal case measured, 12 CT and 10 MR (``scripts/intensity_percentiles.py``);
   with the pretrained LiteMedSAM it gives the box-prompted Dice of LiteMedSAM's own pipeline
   (``scripts/litemedsam_window_sweep.py``); CTNormalization channels get exactly the range nnU-Net
   clipped them to (the dataset's foreground 0.5–99.5 percentiles in
   z-units); [0, 1]-rescaled channels get [0, 1].
2. **Channels.** C channels become SAM's three through a fixed mixing matrix
   (:func:`channel_mixing_matrix`); fixed, so no gradient has to cross the frozen encoder.
3. **Size.** SAM's ``ResizeLongestSide``: the longer side is resized to the encoder input S
   (bilinear, antialiased), the aspect ratio kept, then SAM's pixel normalisation
   (segment_anything's own ``Sam`` mean and std) and zero padding to S×S, as ``Sam.preprocess``.
   LiteMedSAM was pretrained on images in [0, 1] without mean/std: for it the same path divides by
   255 (:func:`pixel_statistics`). Its own pipeline min-max normalises each image instead; the fixed
   window keeps tiles consistent and nnU-Net's intensity augmentation alive, and on the real CT/MR
   slices it gives LiteMedSAM's box-prompted Dice (``tests/test_litemedsam_input.py``).
   Prompts scale like ``ResizeLongestSide.apply_coords``; masks come back like
   ``Sam.postprocess_masks`` (upsample to S×S, crop the padding, resize to the patch).
"""

import inspect
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from nnunetv2_desam.errors import ConfigurationError

ZSCORE_WINDOW = (-1.0, 4.5)  # z-scores mapped to SAM's 0 and 255
UNIT_WINDOW = (0.0, 1.0)
UNIT_RANGE_SCHEMES = ("RescaleTo01Normalization", "RGBTo01Normalization")
UNIT_RANGE_STATISTICS = ((0.0, 0.0, 0.0), (255.0, 255.0, 255.0))  # 0–255 → [0, 1], no mean/std


def sam_pixel_statistics() -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """segment_anything's pixel mean and std (the defaults of ``Sam``, which its builders use)."""
    parameters = inspect.signature(Sam.__init__).parameters
    return tuple(parameters["pixel_mean"].default), tuple(parameters["pixel_std"].default)


def pixel_statistics(config) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The (mean, std) an encoder's pretraining normalised its 0–255 pixels with: SAM's for ViT files and
    MobileSAM, (0, 255) for LiteMedSAM, which was trained on images in [0, 1] (``UNIT_RANGE_STATISTICS``)."""
    if config.tinyvit is not None and config.tinyvit.unit_range_input:
        return UNIT_RANGE_STATISTICS
    return sam_pixel_statistics()


def intensity_windows(normalization_schemes: Sequence[str], foreground_properties: Mapping[str, dict]) -> Tuple[Tuple[float, float], ...]:
    """One (low, high) window of normalised units per input channel, from nnU-Net's plans.

    Args:
        normalization_schemes: the configuration's ``normalization_schemes`` (class names).
        foreground_properties: the plans' ``foreground_intensity_properties_per_channel``.
    """
    windows = []
    for channel, scheme in enumerate(normalization_schemes):
        if scheme == "CTNormalization":
            properties = foreground_properties[str(channel)]
            windows.append(tuple((properties[key] - properties["mean"]) / max(properties["std"], 1e-8)
                                 for key in ("percentile_00_5", "percentile_99_5")))
        elif scheme in UNIT_RANGE_SCHEMES:
            windows.append(UNIT_WINDOW)
        else:
            windows.append(ZSCORE_WINDOW)
    return tuple(windows)


def intensity_windows_from_plans(plans_manager, configuration_manager) -> Tuple[Tuple[float, float], ...]:
    """:func:`intensity_windows` of an nnU-Net ``PlansManager`` and ``ConfigurationManager``."""
    return intensity_windows(configuration_manager.normalization_schemes, plans_manager.foreground_intensity_properties_per_channel)


def channel_mixing_matrix(num_input_channels: int) -> torch.Tensor:
    """3×C matrix mapping C input channels to SAM's RGB.

    C < 3: the channels repeat cyclically (1 channel → grey, 2 → c0, c1, c0). C ≥ 3: SAM channel i
    is the mean of the i-th of three contiguous channel groups.
    """
    mixing = torch.zeros(3, num_input_channels)
    if num_input_channels < 3:
        for rgb in range(3):
            mixing[rgb, rgb % num_input_channels] = 1.0
    else:
        for rgb, group in enumerate(np.array_split(np.arange(num_input_channels), 3)):
            mixing[rgb, group] = 1.0 / len(group)
    return mixing


class SAMInput(nn.Module):
    """nnU-Net patch B×C×H×W → SAM input B×3×S×S, plus the geometry to map prompts and masks.

    ``windows``: one (low, high) per channel (:func:`intensity_windows`), default ``ZSCORE_WINDOW``.
    ``statistics``: the pixel (mean, std) of the encoder's pretraining (:func:`pixel_statistics`), default SAM's.
    ``resized_size(H, W)`` = (h', w'), the patch's size inside the S×S input (longer side S).
    """

    def __init__(self, num_input_channels: int, image_size: int, windows: Optional[Sequence[Tuple[float, float]]] = None,
                 statistics: Optional[Tuple[Sequence[float], Sequence[float]]] = None):
        super().__init__()
        self.image_size = image_size
        windows = torch.tensor(windows if windows is not None else [ZSCORE_WINDOW] * num_input_channels, dtype=torch.float32)
        if windows.shape != (num_input_channels, 2) or not bool((windows[:, 1] > windows[:, 0]).all()):
            raise ConfigurationError(f"DeSAM needs one intensity window (low < high) per input channel ({num_input_channels}), got {windows.tolist()}")
        self.register_buffer("window_low", windows[:, 0].view(1, -1, 1, 1), persistent=False)
        self.register_buffer("window_width", (windows[:, 1] - windows[:, 0]).view(1, -1, 1, 1), persistent=False)
        pixel_mean, pixel_std = statistics if statistics is not None else sam_pixel_statistics()
        self.register_buffer("channel_mixing", channel_mixing_matrix(num_input_channels), persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)

    def intensities(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W normalised intensities → B×C×H×W SAM pixel values in [0, 255] (each channel's window)."""
        return 255.0 * ((x.float() - self.window_low) / self.window_width).clamp(0.0, 1.0)

    def rgb(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W normalised intensities → B×3×H×W RGB in [0, 255], at the patch's size."""
        return torch.einsum("rc,bchw->brhw", self.channel_mixing, self.intensities(x))

    def resized_size(self, patch_size: Tuple[int, int]) -> Tuple[int, int]:
        """(H, W) → (h', w'): SAM's longest-side size, ``ResizeLongestSide.get_preprocess_shape``."""
        return ResizeLongestSide.get_preprocess_shape(patch_size[0], patch_size[1], self.image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W patch → B×3×S×S SAM-normalised, zero-padded image (content in the top-left h'×w')."""
        rgb = self.rgb(x)
        # ResizeLongestSide.apply_image_torch, with the size taken from H×W (its own reads B×C:
        # segment-anything issue #218)
        rgb = F.interpolate(rgb, self.resized_size(x.shape[-2:]), mode="bilinear", align_corners=False, antialias=True)
        normalised = (rgb - self.pixel_mean) / self.pixel_std
        height, width = normalised.shape[-2:]
        return F.pad(normalised, (0, self.image_size - width, 0, self.image_size - height))

    def to_encoder_coordinates(self, coordinates: torch.Tensor, patch_size: Tuple[int, int]) -> torch.Tensor:
        """…×2 (x, y) patch coordinates → the same points in the S×S input (``ResizeLongestSide.apply_coords``)."""
        new_height, new_width = self.resized_size(patch_size)
        scale = coordinates.new_tensor([new_width / patch_size[1], new_height / patch_size[0]])
        return coordinates.float() * scale

    def to_patch(self, masks: torch.Tensor, patch_size: Tuple[int, int], output_size: Tuple[int, int]) -> torch.Tensor:
        """B×K×m×m masks over the S×S input → B×K×``output_size`` over the patch (``Sam.postprocess_masks``).

        ``patch_size`` (H, W) fixes the crop; ``output_size`` is H×W or, for deep supervision, half of it.
        """
        masks = F.interpolate(masks, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        height, width = self.resized_size(patch_size)
        return F.interpolate(masks[..., :height, :width], output_size, mode="bilinear", align_corners=False)
