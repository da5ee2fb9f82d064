"""SAM's input from an nnU-Net patch: intensities, channels, segment_anything's resize and normalisation."""

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
from segment_anything.utils.transforms import ResizeLongestSide

from nnunetv2_desam.networks.sam_checkpoint import SAMConfig, build_sam, load_sam_state_dict
from nnunetv2_desam.errors import ConfigurationError
from nnunetv2_desam.networks.sam_input import ZSCORE_WINDOW, SAMInput, channel_mixing_matrix, intensity_windows

NNUNET_INTENSITY_AUGMENTATIONS = {  # nnU-Net's own transforms, with their strongest setting fixed
    "brightness": MultiplicativeBrightnessTransform(multiplier_range=(1.25, 1.25), synchronize_channels=False),
    "contrast": ContrastTransform(contrast_range=(1.25, 1.25), preserve_range=True, synchronize_channels=False),
    "gamma": GammaTransform(gamma=(1.5, 1.5), p_invert_image=0, synchronize_channels=False, p_per_channel=1, p_retain_stats=1),
}


@pytest.fixture(scope="module")
def sam(tiny_sam_checkpoint):
    return build_sam(SAMConfig.from_state_dict(load_sam_state_dict(tiny_sam_checkpoint))).eval()


def smooth_case(shape, seed=0) -> torch.Tensor:
    """A z-scored 'case' with structure at several scales, 1×1×H×W."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 1, shape[0] // 8, shape[1] // 8, generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=shape, mode="bicubic") + 0.3 * torch.randn(1, 1, *shape, generator=generator)
    return (image - image.mean()) / image.std()


def test_sam_pixel_statistics_are_those_of_a_built_sam(sam):
    sam_input = SAMInput(1, 128)
    assert torch.equal(sam_input.pixel_mean.flatten(), sam.pixel_mean.flatten())
    assert torch.equal(sam_input.pixel_std.flatten(), sam.pixel_std.flatten())


def test_channel_mixing_maps_any_channel_count_to_rgb():
    assert torch.equal(channel_mixing_matrix(1), torch.ones(3, 1))
    assert torch.equal(channel_mixing_matrix(2), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    assert torch.equal(channel_mixing_matrix(3), torch.eye(3))
    five = channel_mixing_matrix(5)
    assert torch.allclose(five.sum(1), torch.ones(3)) and torch.equal(five > 0, torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]).bool())


@pytest.mark.parametrize("augmentation", sorted(NNUNET_INTENSITY_AUGMENTATIONS))
def test_nnunet_intensity_augmentations_reach_the_sam_input(augmentation):
    """Brightness and contrast are affine: a per-patch percentile map would undo them exactly."""
    sam_input = SAMInput(1, 128)
    patch = smooth_case((96, 80))
    augmented = NNUNET_INTENSITY_AUGMENTATIONS[augmentation](image=patch[0].clone())["image"][None]
    assert not torch.equal(augmented, patch)
    height, width = sam_input.resized_size((96, 80))
    pixels, augmented_pixels = ((sam_input(p) * sam_input.pixel_std)[..., :height, :width] for p in (patch, augmented))
    assert (augmented_pixels - pixels).abs().mean() > 1.0  # grey levels of 0-255


def test_overlapping_tiles_of_one_case_map_a_voxel_to_the_same_value():
    """Sliding-window tiles of one case: their intensities come from one map, not from each tile's statistics."""
    sam_input = SAMInput(1, 128)
    case = smooth_case((96, 160), seed=1)
    case[..., :, 100:] *= 3.0  # a bright region that only the second tile contains
    first, second = case[..., :, 0:96], case[..., :, 64:160]
    overlap_in_first, overlap_in_second = sam_input.intensities(first)[..., 64:96], sam_input.intensities(second)[..., 0:32]
    assert torch.equal(overlap_in_first, overlap_in_second)
    assert torch.equal(sam_input.intensities(case)[..., 64:96], overlap_in_first)


def test_the_window_maps_to_sams_pixel_range():
    sam_input = SAMInput(2, 128)
    low, high = ZSCORE_WINDOW
    x = torch.tensor([low - 1.0, low, (low + high) / 2, high, high + 1.0]).view(1, 1, 1, 5).expand(1, 2, 1, 5)
    assert torch.allclose(sam_input.intensities(x)[0, 0, 0], torch.tensor([0.0, 0.0, 127.5, 255.0, 255.0]))


def test_ct_channels_get_the_range_nnunet_clipped_them_to():
    """nnU-Net's own CTNormalization of Hounsfield units: its clip bounds become SAM's 0 and 255."""
    properties = {"0": {"mean": 90.0, "std": 60.0, "percentile_00_5": -120.0, "percentile_99_5": 260.0}}
    windows = intensity_windows(["CTNormalization", "ZScoreNormalization", "RescaleTo01Normalization"], properties)
    assert windows[1] == ZSCORE_WINDOW and windows[2] == (0.0, 1.0)
    hounsfield = np.linspace(-1000.0, 1500.0, 2501, dtype=np.float32)[None]
    normalised = CTNormalization(intensityproperties=properties["0"]).run(hounsfield.copy())
    grey = SAMInput(1, 128, windows[:1]).intensities(torch.from_numpy(normalised)[None, None])[0, 0, 0]
    assert torch.allclose(grey[[0, 880, 1260, 2500]], torch.tensor([0.0, 0.0, 255.0, 255.0]), atol=1e-3)  # -1000, -120, 260, 1500 HU
    assert torch.allclose(grey[1070], torch.tensor(255.0 * 190.0 / 380.0), atol=1e-3)  # 70 HU, halfway
    with pytest.raises(ConfigurationError, match="one intensity window"):
        SAMInput(2, 128, windows[:1])


@pytest.mark.parametrize("patch_size", [(40, 30), (96, 160), (300, 200), (128, 128)])
def test_resize_is_segment_anythings_longest_side_resize_and_preprocess(sam, patch_size):
    """Against ResizeLongestSide.apply_image (PIL, the transform SAM's predictor uses) then Sam.preprocess."""
    sam_input = SAMInput(1, 128)
    grey = sam_input.intensities(smooth_case(patch_size, seed=2)).round()  # whole grey levels, as PIL needs
    low, high = ZSCORE_WINDOW
    patch = low + grey / 255.0 * (high - low)
    resized = ResizeLongestSide(128).apply_image(grey[0, 0, :, :, None].expand(-1, -1, 3).to(torch.uint8).numpy())
    with torch.no_grad():
        expected = sam.preprocess(torch.as_tensor(resized).permute(2, 0, 1).float()[None])
        ours = sam_input(patch)
    height, width = sam_input.resized_size(patch_size)
    assert resized.shape[:2] == (height, width) and max(height, width) == 128
    assert ours.shape == expected.shape == (1, 3, 128, 128)
    pixel_difference = (ours - expected).abs() * sam_input.pixel_std
    assert pixel_difference.max() <= 1.5 and pixel_difference.mean() < 0.5  # PIL rounds to uint8 (no antialiasing: mean 2.5–6.6)
    assert not ours[..., height:, :].any() and not ours[..., :, width:].any()


@pytest.mark.parametrize("patch_size", [(40, 30), (300, 200)])
def test_prompts_and_masks_follow_segment_anythings_geometry(sam, patch_size):
    sam_input = SAMInput(1, 128)
    points = torch.tensor([[[0.0, 0.0], [patch_size[1], patch_size[0]], [7.5, 3.25]]])
    assert torch.allclose(sam_input.to_encoder_coordinates(points, patch_size), ResizeLongestSide(128).apply_coords_torch(points, patch_size))
    masks = torch.randn(2, 3, 32, 32)
    for output_size in (patch_size, (patch_size[0] // 2, patch_size[1] // 2)):
        expected = sam.postprocess_masks(masks, sam_input.resized_size(patch_size), output_size)
        assert torch.equal(sam_input.to_patch(masks, patch_size, output_size), expected)
