"""CSDG (Ouyang et al., TMI 2022) as an nnU-Net trainer: GIN + IPA copies of the batch plus their consistency loss.

nnU-Net imports this file as a top-level module from the folder in ``nnUNet_extTrainer``, so the
rest of the package is imported absolutely.
"""

import torch

from nnunetv2_desam.augmentation.causal_intervention import CSDGSettings, gin_ipa_views, kl_from_mean_consistency
from nnunetv2_desam.augmentation.consistency import MultiViewTraining
from nnunetv2_desam.trainers.nnUNetTrainerBudget import nnUNetTrainerBudget


class nnUNetTrainerCSDG(MultiViewTraining, nnUNetTrainerBudget):
    """nnU-Net's network, plans, augmentation and schedule; each step trains on three copies of the augmented batch
    through random shallow networks (GIN), the first two blended by a random smooth mask (IPA): segmentation loss on
    the first copy + 10 × KL(mean ‖ copy) consistency. A step processes 3× the batch."""

    settings = CSDGSettings()

    def views(self, data: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return gin_ipa_views(data, self.settings)

    def consistency(self, logits):
        return kl_from_mean_consistency(logits)
