"""checkpoint_final.pth: slimmed in memory, written once and atomically; the training prompts resume with --c."""

import os
from unittest import mock

import pytest
import torch

from nnunetv2_desam.networks.prompts import sample_training_points
from nnunetv2_desam.slim_checkpoint import drop_optimizer_moments, save_slim_checkpoint
from tests.nnunet_workspace import nnunet_folders, trainer_arguments


def nnunet_like_save(checkpoint):
    return lambda target: torch.save(checkpoint, target)


def test_the_final_checkpoint_is_slimmed_and_replaces_the_file_in_one_rename(tmp_path):
    target = tmp_path / "checkpoint_final.pth"
    checkpoint = {"network_weights": {"w": torch.ones(3)}, "optimizer_state": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1}]}}
    with mock.patch("nnunetv2_desam.slim_checkpoint.os.replace", wraps=os.replace) as rename:
        save_slim_checkpoint(nnunet_like_save(checkpoint), str(target), drop_optimizer_moments)
    written = torch.load(target, weights_only=False)
    assert written["optimizer_state"] == {"state": {}, "param_groups": [{"lr": 1}]}
    assert torch.equal(written["network_weights"]["w"], torch.ones(3))
    rename.assert_called_once_with(f"{target}.partial", str(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_final.pth"]


def test_an_interrupted_slimming_leaves_the_previous_file_intact(tmp_path):
    target = tmp_path / "checkpoint_final.pth"
    target.write_bytes(b"previous")

    def interrupted(checkpoint):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_slim_checkpoint(nnunet_like_save({"optimizer_state": {"state": {}}}), str(target), interrupted)
    assert target.read_bytes() == b"previous"


def test_nothing_is_written_when_nnunet_writes_nothing(tmp_path):
    save_slim_checkpoint(lambda target: None, str(tmp_path / "checkpoint_final.pth"), drop_optimizer_moments)
    assert not list(tmp_path.iterdir())


def test_resumed_training_draws_the_prompts_of_the_epoch_it_resumes(workspace):
    """``--c`` at epoch 3 draws what an uninterrupted run draws in epoch 3; epochs differ from each other."""
    from nnunetv2_desam.trainers.nnUNetTrainerDeSAM import nnUNetTrainerDeSAM

    root, _ = workspace
    target = (torch.arange(8 * 32 * 32) % 3).view(8, 1, 32, 32)
    draws = []
    with mock.patch.dict(os.environ, nnunet_folders(root)):
        for epoch in (3, 3, 4):
            plans, dataset_json = trainer_arguments(root)  # nnU-Net's trainer pops a key of the plans
            trainer = nnUNetTrainerDeSAM(plans, "2d", 0, dataset_json, device=torch.device("cpu"))
            trainer.current_epoch = epoch
            trainer.seed_training_prompts()
            draws.append(sample_training_points(target, 2, trainer.prompt_generator).points)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
