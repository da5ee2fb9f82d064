"""The grid-prompt rules: crafted per-prompt masks, segment_anything's own mask-generator steps as the oracle of
the authors' sequence, the Table 1 ablations through the trainers' builders, and nnU-Net's sliding window."""

import contextlib
import io
from types import SimpleNamespace

import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from segment_anything.automatic_mask_generator import SamAutomaticMaskGenerator
from segment_anything.utils.amg import MaskData, batched_mask_to_box, is_box_near_crop_edge, mask_to_rle_pytorch, rle_to_mask
from torch import nn
from torchvision.ops.boxes import batched_nms

from nnunetv2_desam.environment_variables import GRID_AGGREGATION_VARIABLE, SAM_CHECKPOINT_VARIABLE
from nnunetv2_desam.errors import ConfigurationError
from nnunetv2_desam.networks.desam import DeSAMSettings, prompt_passes
from nnunetv2_desam.networks.grid_aggregation import (
    GRID_AGGREGATIONS, GridAggregator, aggregate, authors_min_region_area, weighted_probability_sums,
)
from nnunetv2_desam.networks.prompts import grid_points
from nnunetv2_desam.trainers.nnUNetTrainerDeSAM import nnUNetTrainerDeSAM
from nnunetv2_desam.trainers.nnUNetTrainerDeSAM_Ablations import nnUNetTrainerDeSAM_NoMEF, nnUNetTrainerDeSAM_PDMMOnly
from nnunetv2_desam.trainers.nnUNetTrainerDeSAM_Box import nnUNetTrainerDeSAM_Box
from tests.test_desam_network import spread_iou_head

SIZE = 256  # PDMM's output for 1024-input SAM, where the authors' 1000 px apply unscaled


def rectangle(top: int, left: int, height: int, width: int, size: int = SIZE) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top:top + height, left:left + width] = True
    return mask


def square(top: int, left: int, side: int, size: int = SIZE) -> torch.Tensor:
    return rectangle(top, left, side, side, size)


def binary_logits(masks: torch.Tensor, strength: float = 8.0) -> torch.Tensor:
    """Per-prompt masks P×h×w → two-class logits P×2×h×w whose foreground probability is > 0.5 exactly on the mask."""
    foreground = torch.where(masks, strength, -strength)
    return torch.stack([torch.zeros_like(foreground), foreground], dim=1)


def dice(prediction: torch.Tensor, reference: torch.Tensor) -> float:
    return (2 * (prediction & reference).sum() / (prediction.sum() + reference.sum())).item()


def crafted_grid(inside_iou: float, outside_iou: float):
    """81 prompts: 5 inside a 53×53 organ give the organ (IoU ``inside_iou``); 76 elsewhere give the organ plus a
    false 40×40 (1,600-px) blob (IoU ``outside_iou``). Returns logits 81×2×256×256, IoUs 1×81×1, organ, blob."""
    organ, blob = square(40, 40, 53), square(160, 150, 40)
    masks = torch.stack([organ] * 5 + [organ | blob] * 76)
    iou = torch.tensor([inside_iou] * 5 + [outside_iou] * 76).view(1, 81, 1)
    return binary_logits(masks), iou, organ, blob


def segmentation(logits, iou, rule: str, prompts: int = 81) -> torch.Tensor:
    return aggregate(logits, iou, prompts, rule).argmax(1)[0]


@pytest.mark.parametrize("inside, outside", [(0.9, 0.2), (0.95, 0.45)])
def test_gating_removes_the_false_blob_of_low_iou_prompts_that_the_mean_keeps(inside, outside):
    logits, iou, organ, blob = crafted_grid(inside, outside)
    gated, authors, mean = (segmentation(logits, iou, rule).bool() for rule in ("gated", "authors", "mean"))
    assert dice(gated, organ) == 1.0 and dice(authors, organ) == 1.0
    assert mean[blob].all() and dice(mean, organ) < 0.8  # 2·2809 / (2809 + 4409) = 0.78


@pytest.mark.parametrize("rule", ["gated", "authors"])
def test_a_slice_whose_prompts_all_score_below_the_threshold_is_empty(rule):
    logits, iou, _, _ = crafted_grid(0.5, 0.3)  # 0.5 itself does not pass: the authors' test is IoU > 0.5
    probabilities = aggregate(logits, iou, 81, rule).softmax(1)
    assert not probabilities.argmax(1).any()
    assert torch.allclose(probabilities[:, 0], torch.ones(1, SIZE, SIZE))
    assert segmentation(logits, iou, "mean").any()  # the mean has no threshold


def probabilities_as_logits(*maps: torch.Tensor) -> torch.Tensor:
    """Per-prompt class probabilities, each K×h×w → logits P×K×h×w with exactly these softmax values."""
    return torch.stack(maps).clamp_min(1e-12).log()


def test_each_class_is_gated_by_its_own_iou_and_overlaps_go_to_the_larger_mean():
    left = torch.zeros(1, 2, 4)
    left[..., :2] = 1.0
    right = 1.0 - left

    def probabilities(background, class_1, class_2):  # left and right halves: (value on left, value on right)
        return torch.cat([background[0] * left + background[1] * right, class_1[0] * left + class_1[1] * right,
                          class_2[0] * left + class_2[1] * right])

    votes_class_1 = probabilities((0.3, 1.0), (0.7, 0.0), (0.0, 0.0))
    votes_class_2 = probabilities((0.1, 0.2), (0.0, 0.0), (0.9, 0.8))
    votes_nothing = probabilities((0.0, 0.0), (0.0, 0.0), (1.0, 1.0))
    logits = probabilities_as_logits(votes_class_1, votes_class_2, votes_nothing)
    iou = torch.tensor([[[0.9, 0.1], [0.1, 0.8], [0.2, 0.3]]])
    q = aggregate(logits, iou, 3, "gated").exp()[0]
    # left: q1 = 0.7, q2 = 0.9 claim 1.6 in all, so q0 = 0 and both are normalised; right: q0 = 0.2, q2 = 0.8
    assert torch.allclose(q[:, 0, 0], torch.tensor([0.0, 0.7, 0.9]) / 1.6, atol=1e-6)
    assert torch.allclose(q[:, 0, 3], torch.tensor([0.2, 0.0, 0.8]), atol=1e-6)
    assert torch.equal(q.argmax(0), torch.full((2, 4), 2))
    iou[0, 1, 1] = 0.4  # class 2 loses its only voter: gated off, its mass goes to the background
    q = aggregate(logits, iou, 3, "gated").exp()[0]
    assert torch.allclose(q[:, 0, 0], torch.tensor([0.3, 0.7, 0.0]), atol=1e-6)
    assert torch.equal(q.argmax(0), (left[0] > 0).long())
    tie = probabilities_as_logits(probabilities((0.5, 0.5), (0.5, 0.5), (0.0, 0.0)), probabilities((0.5, 0.5), (0.0, 0.0), (0.5, 0.5)))
    q = aggregate(tie, torch.tensor([[[0.9, 0.1], [0.1, 0.9]]]), 2, "gated").exp()[0]
    assert torch.equal(q[1], q[2]) and torch.equal(q.argmax(0), torch.ones(2, 4, dtype=torch.int64))  # ties: lower label


def test_mean_rule_is_the_iou_weighted_mean():
    logits = torch.zeros(2, 3, 1, 1)  # one image, two prompts, three classes
    logits[0, 1] = 10.0  # prompt 0 says class 1
    logits[1, 2] = 10.0  # prompt 1 says class 2
    iou = torch.tensor([[[0.9, 0.1], [0.3, 0.6]]])  # per prompt: IoU for class 1, class 2
    numerator, denominator = weighted_probability_sums(logits, iou, prompts_per_image=2)
    p0, p1 = logits[0, :, 0, 0].softmax(0), logits[1, :, 0, 0].softmax(0)
    w = torch.tensor([[0.5, 0.9, 0.1], [0.45, 0.3, 0.6]])
    assert torch.allclose(numerator[0, :, 0, 0], w[0] * p0 + w[1] * p1, atol=1e-6)
    assert torch.allclose(denominator[0, :, 0, 0], w.sum(0), atol=1e-6)
    assert torch.allclose(aggregate(logits, iou, 2, "mean").exp()[0, :, 0, 0], (w[0] * p0 + w[1] * p1) / w.sum(0), atol=1e-6)
    assert torch.allclose(aggregate(logits, None, 2, "mean").exp()[0, :, 0, 0], (p0 + p1) / 2, atol=1e-6)


def authors_by_hand(foreground_logits: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
    """The authors' generate() for one whole-image crop, step by step on segment_anything's MaskData:
    _process_batch (IoU > 0.5, sigmoid > 0.5, boxes, crop-edge filter, RLEs), _process_crop (box NMS 0.7 by IoU),
    postprocess_small_regions (1000 px at 256², scaled), anns[0]."""
    height, width = foreground_logits.shape[1:]
    data = MaskData(masks=foreground_logits, iou_preds=iou)
    data.filter(data["iou_preds"] > 0.5)
    data["masks"] = torch.sigmoid(data["masks"]) > 0.5
    data["boxes"] = batched_mask_to_box(data["masks"])
    data.filter(~is_box_near_crop_edge(data["boxes"], [0, 0, width, height], [0, 0, width, height]))
    data["rles"] = mask_to_rle_pytorch(data["masks"])
    del data["masks"]
    data.filter(batched_nms(data["boxes"].float(), data["iou_preds"], torch.zeros(len(data["boxes"])), iou_threshold=0.7))
    data.to_numpy()
    area = 1000 * height * width / 256**2
    data = SamAutomaticMaskGenerator.postprocess_small_regions(data, area, 0.7)
    if len(data["rles"]) == 0:
        return torch.zeros(height, width, dtype=torch.bool)
    return torch.as_tensor(rle_to_mask(data["rles"][0]))


def authors_scenario(seed: int, size: int = 64):
    """Random masks of 24 prompts: rectangles (some near-duplicates), specks under the 62.5-px area, holes, empty ones."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(24, size, size, dtype=torch.bool)
    for mask in masks:
        for _ in range(int(torch.randint(0, 3, (1,), generator=generator))):
            top, left = torch.randint(0, size - 8, (2,), generator=generator).tolist()
            height, width = torch.randint(3, 30, (2,), generator=generator).tolist()
            mask[top:top + height, left:left + width] = True
        if torch.rand(1, generator=generator) < 0.3:
            top, left = torch.randint(2, size - 8, (2,), generator=generator).tolist()
            mask[top:top + 5, left:left + 5] = ~mask[top:top + 5, left:left + 5]
    masks[12:18] = masks[:6]  # duplicates for the NMS
    iou = torch.rand(24, generator=generator)
    return binary_logits(masks, strength=3.0), iou


def test_authors_sequence_equals_their_steps_with_segment_anything_helpers():
    size = 64
    organ, shifted, band = square(4, 4, 20, size), square(5, 5, 20, size), rectangle(35, 10, 16, 24, size)
    pierced, holed = organ.clone(), square(30, 36, 20, size)
    pierced[10:13, 10:13] = holed[37:42, 43:48] = False  # holes of 9 and 25 px, under 62.5
    masks = torch.stack([pierced, shifted, band, holed, square(0, 0, 64, size), torch.zeros(size, size, dtype=torch.bool)])
    iou = torch.tensor([0.95, 0.9, 0.8, 0.85, 0.4, 0.7])  # shifted: box IoU 0.81 with pierced, suppressed
    logits = binary_logits(masks)
    expected = authors_by_hand(logits[:, 1], iou)
    assert torch.equal(segmentation(logits, iou.view(1, -1, 1), "authors", prompts=6).bool(), expected)
    # the masks ranked above the band needed small-region removal, so the unchanged band comes first (their anns[0])
    assert torch.equal(expected, band) and authors_min_region_area(size, size) == 62.5
    for seed in range(20):
        logits, iou = authors_scenario(seed)
        ours = segmentation(logits, iou.view(1, -1, 1), "authors", prompts=24).bool()
        assert torch.equal(ours, authors_by_hand(logits[:, 1], iou)), f"scenario {seed}"


@pytest.mark.parametrize("rule", GRID_AGGREGATIONS)
def test_passes_in_any_order_give_the_combination_of_all_prompts_at_once(rule):
    classes = 2 if rule == "authors" else 3
    generator = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(3 * 10, classes, 16, 16, generator=generator)
    iou = 0.5 + 0.2 * torch.randn(3, 10, classes - 1, generator=generator)
    at_once = aggregate(logits, iou, 10, rule)
    aggregator = GridAggregator(rule, 3, 10)
    for images, prompts in reversed(prompt_passes(3, 10, 4)):
        rows = torch.arange(30).view(3, 10)[images, prompts].flatten()
        aggregator.add(images, prompts, logits[rows], iou[images, prompts])
    in_passes = aggregator.result()
    assert (in_passes.exp() - at_once.exp()).abs().max() < 1e-6 and torch.equal(in_passes.argmax(1), at_once.argmax(1))


def build(trainer, patch=(32, 32), classes=3):
    """The trainer's network for a 1-channel z-scored 2d configuration (the plans' parts it reads)."""
    configuration = SimpleNamespace(patch_size=list(patch), normalization_schemes=["ZScoreNormalization"])
    plans = SimpleNamespace(foreground_intensity_properties_per_channel={})
    return trainer.build_network_architecture(plans, configuration, 1, classes, False).eval()


def skip_resizing_back(*networks) -> None:
    """Compare at PDMM's resolution: SAM's way back to the patch (up to the encoder input, crop, down)
    interpolates logits in one network and log-probabilities in the other, which moves argmaxes at edges."""
    for network in networks:
        network.sam_input.to_patch = lambda masks, patch_size, output_size: masks


def test_with_a_set_iou_head_nomef_is_no_longer_pdmm_only(tiny_sam_checkpoint, monkeypatch):
    """Table 1, settings 1 and 3: PDMM alone, and PRIM + IoU head without mask-embedding fusion, where every grid
    prompt gives PDMM's one mask. Same SAM file, same PDMM weights; the IoU head passes some prompts for class 1
    and none for class 2. Gated, class 2 goes to the background; with the IoU-weighted mean the two coincide."""
    monkeypatch.setenv(SAM_CHECKPOINT_VARIABLE, str(tiny_sam_checkpoint))
    torch.manual_seed(0)
    pdmm_only, no_mef = build(nnUNetTrainerDeSAM_PDMMOnly), build(nnUNetTrainerDeSAM_NoMEF)
    no_mef.decoder.load_state_dict(pdmm_only.decoder.state_dict())
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))  # PDMM's own output size
    skip_resizing_back(pdmm_only, no_mef)
    spread_iou_head(no_mef, x, centres=(0.5, -1.0))
    with torch.no_grad():
        _, iou = no_mef(x, points=grid_points(9, (32, 32)).expand(2, -1, -1))
        p, gated = pdmm_only(x).softmax(1), no_mef(x)
    assert 0 < (iou[..., 0] > 0.5).sum() < iou[..., 0].numel() and not (iou[..., 1] > 0.5).any()
    assert (p.argmax(1) == 2).any() and not (gated.argmax(1) == 2).any()
    assert torch.equal(gated.argmax(1), (p[:, 1] > p[:, 0] + p[:, 2]).long())
    monkeypatch.setenv(GRID_AGGREGATION_VARIABLE, "mean")
    no_mef_mean = build(nnUNetTrainerDeSAM_NoMEF)
    no_mef_mean.load_state_dict(no_mef.state_dict())
    skip_resizing_back(no_mef_mean)
    with torch.no_grad():
        assert (no_mef_mean(x).exp() - p).abs().max() < 1e-5


def test_grid_aggregation_is_read_from_the_environment_and_checked(tiny_sam_checkpoint, monkeypatch):
    monkeypatch.setenv(SAM_CHECKPOINT_VARIABLE, str(tiny_sam_checkpoint))
    assert build(nnUNetTrainerDeSAM).settings.grid_aggregation == "gated"
    monkeypatch.setenv(GRID_AGGREGATION_VARIABLE, "authors")
    assert build(nnUNetTrainerDeSAM, classes=2).settings.grid_aggregation == "authors"
    with pytest.raises(ConfigurationError, match="binary sequence"):
        build(nnUNetTrainerDeSAM, classes=3)
    build(nnUNetTrainerDeSAM_Box, classes=3)  # one box prompt: no grid to combine
    monkeypatch.setenv(GRID_AGGREGATION_VARIABLE, "union")
    with pytest.raises(ConfigurationError, match=f"{GRID_AGGREGATION_VARIABLE} must be one of gated, mean, authors"):
        build(nnUNetTrainerDeSAM)
    with pytest.raises(ConfigurationError, match="must be one of"):
        DeSAMSettings(grid_aggregation="union")


class OrganGridStub(nn.Module):
    """Stands in for DeSAM's decoding in nnU-Net's sliding window: a 3×3 grid over each tile, every prompt giving
    the same mask (input > 0.5, as without mask-embedding fusion), IoU 0.9 where the prompt hits it and 0.1 elsewhere;
    combined by ``rule``."""

    def __init__(self, rule: str):
        super().__init__()
        self.rule = rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        organ = x[:, 0] > 0.5
        points = grid_points(3, (height, width)).long()
        hit = organ[:, points[:, 1], points[:, 0]]  # B×9
        logits = binary_logits(organ.repeat_interleave(9, dim=0))
        return aggregate(logits, torch.where(hit, 0.9, 0.1)[..., None], 9, self.rule)


@pytest.mark.parametrize("rule", GRID_AGGREGATIONS)
def test_overlapping_tiles_average_to_the_gated_segmentation(rule):
    """One 96×160 slice, 96×96 tiles at x = 0, 32, 64 (nnU-Net's step 0.5). The organ (rows 40-59, columns 86-119)
    is hit by grid points of tiles 1 and 2 only; tile 0 covers columns 86-95 of it but gates it off. After nnU-Net's
    Gaussian averaging: every label all covering tiles agree on is kept, nothing is infinite, and the organ is whole
    (tile 0 sees it only near its own border, where its weight is small)."""
    image = torch.zeros(1, 1, 96, 160)
    image[..., 40:60, 86:120] = 1.0
    organ = image[0, 0] > 0.5
    plans = PlansManager({"label_manager": "LabelManager", "configurations": {}})
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=torch.device("cpu"),
                                    perform_everything_on_device=False, allow_tqdm=False)
    predictor.manual_initialization(OrganGridStub(rule), plans, SimpleNamespace(patch_size=[96, 96]), None,
                                    {"labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}, "stub", None)
    with torch.no_grad():
        averaged = predictor.predict_sliding_window_return_logits(image)[:, 0].float()
        tiles = [(left, OrganGridStub(rule)(image[..., left:left + 96]).argmax(1)[0]) for left in (0, 32, 64)]
    assert torch.isfinite(averaged).all()
    labels = averaged.argmax(0)
    votes = torch.zeros(2, 96, 160, dtype=torch.int64)
    for left, tile in tiles:
        votes[:, :, left:left + 96] += torch.stack([tile == 0, tile == 1]).long()
    covering = votes.sum(0)
    for label in (0, 1):
        agreed = votes[label] == covering
        assert torch.equal(labels[agreed], torch.full_like(labels[agreed], label))
    if rule != "mean":  # tile 0 alone drops its part of the organ; the mean has no gate
        assert not tiles[0][1][organ[:, :96]].any()
    assert dice(labels.bool(), organ) == 1.0
