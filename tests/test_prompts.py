"""Training point prompts and the inference grid."""

import torch

from nnunetv2_desam.networks.prompts import grid_points, sample_training_points


def label_batch() -> torch.Tensor:
    target = torch.zeros(64, 1, 20, 30, dtype=torch.int16)
    target[:, :, 2:8, 3:9] = 1
    target[:, :, 12:18, 20:28] = 2
    return target


def test_sampling_is_deterministic_under_a_seed():
    first = sample_training_points(label_batch(), 2, torch.Generator().manual_seed(7))
    second = sample_training_points(label_batch(), 2, torch.Generator().manual_seed(7))
    other = sample_training_points(label_batch(), 2, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


def test_points_land_inside_or_outside_the_foreground_one_to_one_with_matching_iou_targets():
    target = label_batch().repeat(8, 1, 1, 1)  # 512 samples
    points, iou_target = sample_training_points(target, 2, torch.Generator().manual_seed(0))
    assert points.shape == (512, 1, 2) and iou_target.shape == (512, 2)
    columns, rows = points[:, 0, 0].floor().long(), points[:, 0, 1].floor().long()
    hit = target[torch.arange(512), 0, rows, columns].long()
    assert torch.equal(iou_target, torch.stack([hit == 1, hit == 2], dim=1).float())
    inside = (hit > 0).float().mean().item()
    assert 0.4 < inside < 0.6
    assert torch.allclose(points - points.floor(), torch.full_like(points, 0.5))  # pixel centres


def test_ignore_label_is_never_chosen_and_empty_sets_fall_back():
    target = torch.full((32, 1, 6, 6), 3, dtype=torch.int16)  # 3 = ignore
    target[:16, :, 0, 0] = 1  # foreground only, no background
    target[16:, :, 5, 5] = 0  # background only, no foreground
    points, iou_target = sample_training_points(target, 2, torch.Generator().manual_seed(0), ignore_label=3)
    assert torch.equal(points[:16, 0], torch.tensor([0.5, 0.5]).expand(16, 2))
    assert torch.equal(points[16:, 0], torch.tensor([5.5, 5.5]).expand(16, 2))
    assert torch.equal(iou_target[:16], torch.tensor([1.0, 0.0]).expand(16, 2)) and not iou_target[16:].any()


def test_grid_points_sit_at_the_centres_of_an_n_by_n_tiling():
    points = grid_points(3, (30, 60))
    assert points.shape == (9, 2)
    assert torch.equal(points[:3], torch.tensor([[10.0, 5.0], [30.0, 5.0], [50.0, 5.0]]))
    assert torch.equal(points[::3, 1], torch.tensor([5.0, 15.0, 25.0]))
