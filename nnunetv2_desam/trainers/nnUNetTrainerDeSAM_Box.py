"""DeSAM-B as an nnU-Net trainer: the whole image as the box prompt.

nnU-Net imports this file as a top-level module; the rest of the package is imported absolutely.
"""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_desam.networks.desam import DeSAMSettings
from nnunetv2_desam.trainers.nnUNetTrainerDeSAM import nnUNetTrainerDeSAM


class nnUNetTrainerDeSAM_Box(nnUNetTrainerDeSAM):
    """DeSAM-B: the whole-image box in training and inference; Dice + CE (nnU-Net's own train_step)."""

    desam_settings = DeSAMSettings(prompt_mode="box", use_iou_head=False)

    def train_step(self, batch: dict) -> dict:
        return nnUNetTrainer.train_step(self, batch)
