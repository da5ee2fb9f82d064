"""What the SAM fine-tuning baselines (nnUNetTrainerMedSAM, nnUNetTrainerSAMed) share; not a method to train.

nnU-Net imports this file as a top-level module from the folder in ``nnUNet_extTrainer``, so the
rest of the package is imported absolutely.
"""

import torch

from nnunetv2_desam.trainers.nnUNetTrainerSAMSetting import nnUNetTrainerSAMSetting


class nnUNetTrainerSAMFineTuning(nnUNetTrainerSAMSetting):
    """DeSAM's setting (:class:`nnUNetTrainerSAMSetting`) with one output (no deep supervision) and AdamW over
    the parameters that train. Subclasses set ``method``, ``learning_rate``, ``adamw_weight_decay`` and build
    the network.
    """

    requires_sam_checkpoint = True  # read by nnUNetv2_desam_crossdomain's checks
    honours_desam_budget = True
    learning_rate = 0.0
    adamw_weight_decay = 0.0
    adamw_betas = (0.9, 0.999)  # both authors' AdamW (SAMed explicitly, MedSAM by PyTorch's default)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.initial_lr = self.learning_rate
        self.weight_decay = self.adamw_weight_decay

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """One output: there is nothing to switch (nnU-Net's version expects ``network.decoder``)."""

    def trainable_parameters(self) -> list:
        return [p for p in self.network.parameters() if p.requires_grad]

    def make_optimizer(self) -> torch.optim.AdamW:
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.initial_lr, betas=self.adamw_betas, weight_decay=self.weight_decay)
