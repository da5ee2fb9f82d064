"""Training point prompts and the inference grid."""

import torch

import pytest

from nnunetv2_desam.networks.prompts import TrainingPrompts, grid_points, iou_loss_per_class, sample_training_points


def label_batch() -> torch.Tensor:
    target = torch.zeros(64, 1, 20, 30, dtype=torch.int16)
    target[:, :, 2:8, 3:9] = 1
    target[:, :, 12:18, 20:28] = 2
    return target


def hit_labels(points: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    columns, rows = points[:, 0, 0].floor().long(), points[:, 0, 1].floor().long()
    return target[torch.arange(len(target)), 0, rows, columns].long()


def test_sampling_is_deterministic_under_a_seed():
    first = sample_training_points(label_batch(), 2, torch.Generator().manual_seed(7))
    second = sample_training_points(label_batch(), 2, torch.Generator().manual_seed(7))
    other = sample_training_points(label_batch(), 2, torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first.points, other.points)


def test_binary_points_land_inside_or_outside_the_foreground_one_to_one_as_the_authors_draw_them():
    target = (label_batch() > 0).to(torch.int16).repeat(8, 1, 1, 1)  # 512 samples, one foreground class
    prompts = sample_training_points(target, 1, torch.Generator().manual_seed(0))
    assert prompts.points.shape == (512, 1, 2) and prompts.iou_target.shape == prompts.supervised.shape == (512, 1)
    hit = hit_labels(prompts.points, target)
    assert torch.equal(prompts.iou_target[:, 0], (hit == 1).float())
    assert torch.all(prompts.supervised == 1)
    assert 0.4 < (hit == 1).float().mean().item() < 0.6
    assert torch.allclose(prompts.points - prompts.points.floor(), torch.full_like(prompts.points, 0.5))  # pixel centres


def test_every_class_output_gets_balanced_targets_whatever_its_size():
    """Four classes of very different sizes (1 px to half the patch): each output's supervised targets are ~1:1
    and each output is supervised in ~a quarter of the samples."""
    target = torch.zeros(4000, 1, 20, 30, dtype=torch.int16)
    target[:, :, :10, :] = 1  # 300 px
    target[:, :, 12:16, 2:12] = 2  # 40 px
    target[:, :, 12:14, 20:22] = 3  # 4 px
    target[:, :, 18, 29] = 4  # 1 px
    prompts = sample_training_points(target, 4, torch.Generator().manual_seed(0))
    hit = hit_labels(prompts.points, target)
    assert torch.all(prompts.supervised.sum(1) == 1)
    assert torch.equal(prompts.iou_target, (hit[:, None] == torch.arange(1, 5)[None]).float())
    for k in range(4):
        chosen = prompts.supervised[:, k] == 1
        assert 0.2 < chosen.float().mean().item() < 0.3
        assert 0.45 < prompts.iou_target[chosen, k].mean().item() < 0.55


def test_only_classes_present_in_the_patch_are_chosen_and_empty_patches_train_no_iou_output():
    """Patches without foreground still get a point (the mask loss needs a prompt) but supervise no IoU output:
    as negatives they would pull every output's share of positives under 1:1, and the gate's 0.5 with it."""
    target = torch.zeros(400, 1, 10, 10, dtype=torch.int16)
    target[:200, :, 2:5, 2:5] = 2  # only class 2 present
    prompts = sample_training_points(target, 3, torch.Generator().manual_seed(0))
    assert torch.equal(prompts.supervised[:200], torch.tensor([0.0, 1.0, 0.0]).expand(200, 3))
    assert 0.4 < prompts.iou_target[:200, 1].mean().item() < 0.6
    assert not prompts.supervised[200:].any() and not prompts.iou_target[200:].any()
    assert len(set(map(tuple, prompts.points[200:, 0].tolist()))) > 20  # points spread over the empty patches


def test_ignore_label_is_never_chosen_and_empty_sets_fall_back():
    target = torch.full((32, 1, 6, 6), 3, dtype=torch.int16)  # 3 = ignore
    target[:16, :, 0, 0] = 1  # foreground only, no background
    target[16:, :, 5, 5] = 0  # background only, no foreground
    prompts = sample_training_points(target, 2, torch.Generator().manual_seed(0), ignore_label=3)
    assert torch.equal(prompts.points[:16, 0], torch.tensor([0.5, 0.5]).expand(16, 2))
    assert torch.equal(prompts.points[16:, 0], torch.tensor([5.5, 5.5]).expand(16, 2))
    assert torch.equal(prompts.iou_target[:16], torch.tensor([1.0, 0.0]).expand(16, 2)) and not prompts.iou_target[16:].any()
    assert torch.all(prompts.supervised[:16, 0] == 1)  # class 1 is the only one present
    assert not prompts.supervised[16:].any()  # no foreground: no IoU output trained


def test_the_iou_loss_is_each_class_mse_over_its_supervised_samples_summed_over_classes():
    """Class 1: samples 0 and 2, ((0.2 − 1)² + 0.4²) / 2 = 0.4; class 2: sample 1, 0.1² = 0.01; unsupervised outputs ignored."""
    iou = torch.tensor([[0.2, 0.9], [0.7, 0.1], [0.4, 0.6]])
    prompts = TrainingPrompts(points=torch.zeros(3, 1, 2), iou_target=torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]),
                              supervised=torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    assert iou_loss_per_class(iou, prompts).item() == pytest.approx(0.41)
    one_class = TrainingPrompts(prompts.points, prompts.iou_target, torch.tensor([[1.0, 0.0]] * 3))
    assert iou_loss_per_class(iou, one_class).item() == pytest.approx((0.64 + 0.49 + 0.16) / 3)  # class 2 adds nothing


def test_grid_points_sit_at_the_centres_of_an_n_by_n_tiling():
    points = grid_points(3, (30, 60))
    assert points.shape == (9, 2)
    assert torch.equal(points[:3], torch.tensor([[10.0, 5.0], [30.0, 5.0], [50.0, 5.0]]))
    assert torch.equal(points[::3, 1], torch.tensor([5.0, 15.0, 25.0]))
