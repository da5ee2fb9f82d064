"""The paper's Table 1 ablations of DeSAM-P as nnU-Net trainers (settings 1-3; setting 4 is nnUNetTrainerDeSAM).

nnU-Net imports this file as a top-level module; the rest of the package is imported absolutely.
"""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_desam.networks.desam import DeSAMSettings
from nnunetv2_desam.trainers.nnUNetTrainerDeSAM import nnUNetTrainerDeSAM


class nnUNetTrainerDeSAM_PDMMOnly(nnUNetTrainerDeSAM):
    """Table 1, setting 1: PDMM on the encoder taps alone, no PRIM (no prompts at all); Dice + CE (nnU-Net's own train_step)."""

    desam_settings = DeSAMSettings(prompt_mode="none", use_prim=False, use_iou_head=False, fuse_mask_embedding=False)

    def train_step(self, batch: dict) -> dict:
        return nnUNetTrainer.train_step(self, batch)


class nnUNetTrainerDeSAM_NoIoUHead(nnUNetTrainerDeSAM):
    """Table 1, setting 2: PRIM + PDMM with mask-embedding fusion, without the IoU head (grid prompts averaged)."""

    desam_settings = DeSAMSettings(prompt_mode="points", use_iou_head=False)


class nnUNetTrainerDeSAM_NoMEF(nnUNetTrainerDeSAM):
    """Table 1, setting 3: PRIM + PDMM with the IoU head, without mask-embedding fusion."""

    desam_settings = DeSAMSettings(prompt_mode="points", fuse_mask_embedding=False)
