"""DeSAM-P as an nnU-Net trainer: random point prompts in training, a grid of points at inference.

nnU-Net imports this file as a top-level module from the folder in ``nnUNet_extTrainer``, so the
rest of the package is imported absolutely.
"""

import zlib

import torch

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunetv2_desam.environment_variables import (
    grid_aggregation_from_environment,
    grid_size_from_environment,
    learning_rate_from_environment,
    sam_checkpoint_path,
)
from nnunetv2_desam.networks.desam import DeSAM, DeSAMSettings
from nnunetv2_desam.networks.prompts import iou_loss_per_class, sample_training_points
from nnunetv2_desam.networks.sam_input import intensity_windows_from_plans
from nnunetv2_desam.trainers.nnUNetTrainerSAMSetting import nnUNetTrainerSAMSetting
from nnunetv2_desam.training_step import autocast_on_cuda, backward_and_step

PAPER_LEARNING_RATE = 1e-4


class nnUNetTrainerDeSAM(nnUNetTrainerSAMSetting):
    """DeSAM-P: one random point per sample in training, a 9×9 grid at inference; Dice + CE + 10·MSE(IoU).

    Paper settings: Adam, lr 1e-4, batch 8, poly decay, only PRIM/PDMM in the optimizer. Budget:
    50 epochs × 100 iterations = 5,000 iterations at batch 8, about 1.3× the paper's ~3.8 k; the
    paper trains on fixed precomputed slices, here every sample is freshly augmented by nnU-Net.
    ``DESAM_EPOCHS`` and friends, ``DESAM_BATCH_SIZE`` and ``DESAM_LEARNING_RATE`` override budget,
    batch size and learning rate.
    """

    method = "DeSAM"
    desam_settings = DeSAMSettings(prompt_mode="points")
    iou_loss_weight = 10.0
    deep_supervision_weights = (2.0 / 3.0, 1.0 / 3.0)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = learning_rate_from_environment(PAPER_LEARNING_RATE)
        self.weight_decay = 0.0
        self.prompt_generator = torch.Generator()
        self.seed_training_prompts()

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision: bool = True) -> DeSAM:
        """The SAM file comes from DESAM_SAM_CHECKPOINT, the grid from DESAM_GRID_SIZE and DESAM_GRID_AGGREGATION,
        the intensity windows from the plans (called by the trainer and by nnUNetv2_predict, so both map intensities alike)."""
        cls.require_2d(configuration_manager)
        default = cls.desam_settings
        settings = DeSAMSettings(**{
            **default.to_dict(),
            "grid_size": grid_size_from_environment(default.grid_size),
            "grid_aggregation": grid_aggregation_from_environment(default.grid_aggregation),
        })
        windows = intensity_windows_from_plans(plans_manager, configuration_manager)
        network = DeSAM.from_sam_checkpoint(sam_checkpoint_path(), num_input_channels, num_output_channels, settings=settings, intensity_windows=windows)
        network.decoder.deep_supervision = enable_deep_supervision
        return network

    def _get_deep_supervision_scales(self):
        """PDMM's two outputs: the patch size and half of it."""
        return [[1.0, 1.0], [0.5, 0.5]] if self.enable_deep_supervision else None

    def _build_loss(self):
        """nnU-Net's Dice + CE; both PDMM heads weighted (nnU-Net would zero the lowest resolution)."""
        loss = super()._build_loss()
        if self.enable_deep_supervision:
            loss.weight_factors = self.deep_supervision_weights
        return loss

    def configure_optimizers(self):
        trainable = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def seed_training_prompts(self) -> None:
        """Seed the training prompts from (fold, DDP rank, epoch): ``--c`` resumes with the prompts the epoch would have
        drawn (no generator state to keep in the checkpoint), and every rank draws its own. Fold may be 'all'."""
        self.prompt_generator.manual_seed(zlib.crc32(f"{self.fold}/{self.local_rank}/{self.current_epoch}".encode()))

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.seed_training_prompts()

    def train_step(self, batch: dict) -> dict:
        target = batch["target"]
        full_target = target[0] if isinstance(target, list) else target
        prompts = sample_training_points(
            full_target, self.label_manager.num_segmentation_heads - 1, self.prompt_generator, self.label_manager.ignore_label
        )
        data = batch["data"].to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) else target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_on_cuda(self.device):
            output, iou = self.network(data, points=prompts.points.to(self.device))
            loss = self.loss(output, target)
            if iou is not None:
                loss = loss + self.iou_loss_weight * iou_loss_per_class(iou[:, 0], prompts)
        backward_and_step(loss, self.optimizer, self.grad_scaler, self.network.parameters())
        return {"loss": loss.detach().cpu().numpy()}
