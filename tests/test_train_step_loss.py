"""DeSAM-P's real ``train_step``: the loss it optimises is 2/3 · (Dice + CE) at full resolution + 1/3 · (Dice + CE) at
half resolution + 10 · Σ_k MSE_k of the IoU outputs, recomputed here from the network's outputs with other code."""

import os
from unittest import mock

import torch

from nnunetv2_desam.networks.prompts import sample_training_points
from tests.nnunet_workspace import nnunet_folders, trainer_arguments


def test_the_trainers_loss_weights_deep_supervision_two_thirds_one_third_and_the_iou_mse_by_ten(workspace):
    from nnunetv2_desam.trainers.nnUNetTrainerDeSAM import nnUNetTrainerDeSAM

    root, env = workspace
    plans, dataset_json = trainer_arguments(root)
    with mock.patch.dict(os.environ, {**nnunet_folders(root), "DESAM_SAM_CHECKPOINT": env["DESAM_SAM_CHECKPOINT"], "DESAM_BATCH_SIZE": "4"}):
        trainer = nnUNetTrainerDeSAM(plans, "2d", 0, dataset_json, device=torch.device("cpu"))
        trainer.initialize()
        trainer.on_train_start()
        batch = next(trainer.dataloader_train)
        trainer.on_train_end()
    network = trainer.network.train()
    weights = {k: v.clone() for k, v in network.state_dict().items()}
    generator_state = trainer.prompt_generator.get_state()

    reported = float(trainer.train_step(batch)["loss"])

    network.load_state_dict(weights)
    trainer.prompt_generator.set_state(generator_state)
    targets = batch["target"]
    prompts = sample_training_points(targets[0], trainer.label_manager.num_segmentation_heads - 1, trainer.prompt_generator)
    with torch.no_grad():
        (full, half), iou = network(batch["data"], points=prompts.points)
        segmentation = trainer.loss.loss  # nnU-Net's Dice + CE, unwrapped from its deep-supervision weighting
        expected_segmentation = 2 / 3 * segmentation(full, targets[0]) + 1 / 3 * segmentation(half, targets[1])
        supervised = prompts.supervised
        squared = (iou[:, 0] - prompts.iou_target) ** 2
        per_class = [(squared[:, k] * supervised[:, k]).sum() / supervised[:, k].sum() for k in range(supervised.shape[1]) if supervised[:, k].any()]
        expected = expected_segmentation + 10 * sum(per_class)
    assert per_class and float(10 * sum(per_class)) > 1e-3  # the IoU term is there to be weighed
    assert abs(reported - float(expected)) <= 1e-4 * abs(float(expected)) + 1e-5
