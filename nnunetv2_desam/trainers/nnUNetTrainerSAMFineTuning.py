"""What the SAM fine-tuning baselines (nnUNetTrainerMedSAM, nnUNetTrainerSAMed) share; not a method to train.

nnU-Net imports this file as a top-level module from the folder in ``nnUNet_extTrainer``, so the
rest of the package is imported absolutely.
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_desam.environment_variables import apply_training_overrides
from nnunetv2_desam.errors import ConfigurationError
from nnunetv2_desam.trainer_checks import check_before_nnunet_starts, require_2d
from nnunetv2_desam.slim_checkpoint import drop_optimizer_moments, is_final_checkpoint, save_slim_checkpoint
from nnunetv2_desam.trainers.nnUNetTrainerDeSAM import PAPER_BATCH_SIZE


class nnUNetTrainerSAMFineTuning(nnUNetTrainer):
    """The setting MedSAM and SAMed share with DeSAM, so that the rows of Table 2 differ only by method.

    2D only, plain labels (no regions), one output (no deep supervision), DeSAM's budget of
    50 epochs × 100 iterations at batch 8 (``DESAM_EPOCHS`` and friends, ``DESAM_BATCH_SIZE``
    override it), no test-time mirroring, AdamW over the parameters that train, and a
    ``checkpoint_final.pth`` without the optimizer's moments. Subclasses set ``method``,
    ``learning_rate``, ``adamw_weight_decay`` and build the network.
    """

    method = ""
    requires_sam_checkpoint = True  # read by nnUNetv2_desam_crossdomain's checks
    honours_desam_budget = True
    learning_rate = 0.0
    adamw_weight_decay = 0.0
    adamw_betas = (0.9, 0.999)  # both authors' AdamW (SAMed explicitly, MedSAM by PyTorch's default)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = torch.device("cuda")):
        if not type(self).method:
            raise ConfigurationError(f"{type(self).__name__} is the common part of nnUNetTrainerMedSAM and nnUNetTrainerSAMed; train one of those")
        check_before_nnunet_starts(plans, configuration, type(self).method)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise ConfigurationError(f"region-based datasets are not supported by {self.method}; use plain labels")
        self.enable_deep_supervision = False
        self.initial_lr = self.learning_rate
        self.weight_decay = self.adamw_weight_decay
        self.num_epochs = 50
        self.num_iterations_per_epoch = 100
        self.configuration_manager.configuration["batch_size"] = PAPER_BATCH_SIZE
        apply_training_overrides(self)

    @classmethod
    def require_2d(cls, configuration_manager, configuration: str = "") -> None:
        require_2d(configuration_manager.patch_size, cls.method, configuration)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """One output: there is nothing to switch (nnU-Net's version expects ``network.decoder``)."""

    def trainable_parameters(self) -> list:
        return [p for p in self.network.parameters() if p.requires_grad]

    def make_optimizer(self) -> torch.optim.AdamW:
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.initial_lr, betas=self.adamw_betas, weight_decay=self.weight_decay)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """Mirroring stays a training augmentation; test-time mirroring is off (4× the inference cost), as for DeSAM."""
        configuration = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return configuration

    def save_checkpoint(self, filename: str) -> None:
        """As nnU-Net's; checkpoint_final.pth is slimmed by :meth:`slim_final_checkpoint` and written once."""
        if is_final_checkpoint(filename):
            save_slim_checkpoint(super().save_checkpoint, filename, self.slim_final_checkpoint)
        else:
            super().save_checkpoint(filename)

    def slim_final_checkpoint(self, checkpoint: dict) -> None:
        """Drop AdamW's moments (2× the trained weights); the parameter groups stay, so ``--c`` still loads."""
        drop_optimizer_moments(checkpoint)
