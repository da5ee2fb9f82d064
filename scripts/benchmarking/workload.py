"""What every benchmark row runs on: SAM sizes, workloads, nnU-Net plans, synthetic data, the networks."""

from dataclasses import dataclass
from functools import cached_property
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from segment_anything import sam_model_registry
from torch import nn

from benchmarking.measurement import log
from nnunetv2_desam.experiments.synthetic import DEFAULT_DOMAINS, LABELS, synthetic_case
from nnunetv2_desam.networks.desam import DeSAM, DeSAMSettings
from nnunetv2_desam.networks.sam_checkpoint import SAMConfig, build_sam

MODELS = ("tiny", "small", "vit_b", "vit_l", "vit_h")
NUM_CLASSES = len(LABELS)


def _small_sam(img_size: int, embed_dim: int, num_heads: int, window_size: int, prompt_dim: int, mlp_dim: int) -> SAMConfig:
    """An 8-block SAM in the official layout, global attention in blocks 1, 3, 5, 7."""
    return SAMConfig(
        img_size=img_size, patch_size=16, encoder_embed_dim=embed_dim, encoder_depth=8,
        encoder_num_heads=num_heads, encoder_mlp_ratio=4.0, encoder_window_size=window_size,
        encoder_global_attn_indexes=(1, 3, 5, 7), prompt_embed_dim=prompt_dim, mask_in_chans=16,
        num_mask_tokens=4, transformer_depth=2, transformer_mlp_dim=mlp_dim, attention_downsample_rate=2,
        iou_head_depth=3, iou_head_hidden_dim=prompt_dim,
    )


# tiny = the tests' SAM (write_random_sam_checkpoint's defaults); vit_* come from segment_anything.
SMALL_SAMS = {"tiny": _small_sam(128, 32, 2, 4, 32, 64), "small": _small_sam(256, 192, 3, 8, 64, 256)}


@dataclass(frozen=True)
class Workload:
    encoder_batch: int
    train_batch: int
    nnunet_batch: int
    patch: int  # square patch of the training step, grid inference and sliding window
    volume_slices: int


WORKLOADS = {
    "cuda": Workload(encoder_batch=8, train_batch=8, nnunet_batch=12, patch=384, volume_slices=30),
    "cpu": Workload(encoder_batch=2, train_batch=2, nnunet_batch=3, patch=128, volume_slices=2),
    "tiny": Workload(encoder_batch=2, train_batch=2, nnunet_batch=2, patch=64, volume_slices=1),
}



def random_sam_state_dict(model: str) -> Dict[str, torch.Tensor]:
    """A SAM with random weights; positional tables randomised too (SAM zero-initialises them)."""
    sam = sam_model_registry[model]() if model in sam_model_registry else build_sam(SMALL_SAMS[model])
    with torch.no_grad():
        for name, parameter in sam.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                parameter.normal_(std=0.1)
    return sam.state_dict()


def nnunet_plans(workload: Workload) -> PlansManager:
    """Minimal plans: a 2d configuration with the PlainConvUNet nnU-Net's planner derives for the patch.

    Only what the network builder, the loss and the predictor read is filled in.
    """
    patch = [workload.patch, workload.patch]
    _, strides, kernel_sizes, _, _ = get_pool_and_conv_props([1.0, 1.0], patch, 4, 999999)
    stages = len(strides)
    architecture = {
        "network_class_name": f"{PlainConvUNet.__module__}.{PlainConvUNet.__name__}",
        "arch_kwargs": {
            "n_stages": stages,
            "features_per_stage": [min(32 * 2**i, 512) for i in range(stages)],
            "conv_op": "torch.nn.modules.conv.Conv2d",
            "kernel_sizes": kernel_sizes,
            "strides": strides,
            "n_conv_per_stage": [2] * stages,
            "n_conv_per_stage_decoder": [2] * (stages - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    configuration = {"patch_size": patch, "batch_size": workload.nnunet_batch, "batch_dice": True, "architecture": architecture}
    return PlansManager({"label_manager": "LabelManager", "configurations": {"2d": configuration}})


DATASET_JSON = {"labels": LABELS, "channel_names": {"0": "MRI"}, "file_ending": ".nii.gz"}


class Setup:
    """Networks, plans and data, built on first use and shared by the rows."""

    def __init__(self, model: str, device: torch.device, workload: Workload):
        self.model, self.device, self.workload = model, device, workload
        self.plans = nnunet_plans(workload)
        self.configuration = self.plans.get_configuration("2d")
        self.label_manager = self.plans.get_label_manager(DATASET_JSON)

    @cached_property
    def sam_state_dict(self) -> Dict[str, torch.Tensor]:
        log(f"building a random SAM ({self.model})")
        return random_sam_state_dict(self.model)

    @cached_property
    def sam_config(self) -> SAMConfig:
        return SAMConfig.from_state_dict(self.sam_state_dict)

    @cached_property
    def ours(self) -> DeSAM:
        """Fused attention and prompt-shared decoding; the encoder in fp32 on a CPU as in ``reference``, so that the rows
        compare these paths (the CPU's bf16 encoder: ``benchmark_litemedsam_cpu.py``)."""
        log("building DeSAM (fused attention, prompt-shared decoding)")
        torch.manual_seed(0)
        return DeSAM(self.sam_state_dict, 1, NUM_CLASSES, cpu_bf16=False).to(self.device)

    @cached_property
    def reference(self) -> DeSAM:
        """segment_anything's attention, PDMM once per prompt, all grid prompts in one pass; the same
        trainable weights as ``ours``."""
        log("building DeSAM (reference paths)")
        network = DeSAM(self.sam_state_dict, 1, NUM_CLASSES, fused_attention=False, prompt_shared_decoding=False,
                        skip_gated_off_prompts=False, cpu_bf16=False, prompt_chunk_size=DeSAMSettings().grid_size ** 2)
        network.load_state_dict(self.ours.state_dict())
        return network.to(self.device)

    @cached_property
    def nnunet(self) -> nn.Module:
        """PlainConvUNet built the way nnUNetTrainer.build_network_architecture does."""
        architecture = self.configuration.configuration["architecture"]
        network = get_network_from_plans(
            architecture["network_class_name"], architecture["arch_kwargs"], architecture["_kw_requires_import"],
            1, NUM_CLASSES, allow_init=True, deep_supervision=True,
        )
        return network.to(self.device)

    @cached_property
    def volume(self):
        """A z-scored synthetic volume 1×Z×P×P (float32) and its labels Z×1×P×P (int16), on the CPU."""
        w = self.workload
        slices = max(w.encoder_batch, w.train_batch, w.nnunet_batch, w.volume_slices)
        image, labels = synthetic_case(DEFAULT_DOMAINS[0], np.random.default_rng(0), shape=(slices, w.patch, w.patch))
        image = (image - image.mean()) / image.std()
        return torch.from_numpy(image)[None], torch.from_numpy(labels.astype(np.int16))[:, None]

    def middle(self, count: int) -> slice:
        start = (self.volume[0].shape[1] - count) // 2
        return slice(start, start + count)

    def slices(self, count: int) -> torch.Tensor:
        """count slices from the middle of the volume, B×1×P×P on the device."""
        return self.volume[0][0, self.middle(count), None].to(self.device)

    def training_batch(self, batch: int, scales: List[float]) -> dict:
        """nnU-Net's batch layout: data B×1×P×P, target one label map per deep-supervision scale (CPU)."""
        image, labels = self.volume
        data, target = image[0, self.middle(batch), None], labels[self.middle(batch)]
        targets = [F.interpolate(target.float(), scale_factor=s, mode="nearest").to(torch.int16) if s != 1 else target for s in scales]
        if self.device.type == "cuda":
            data, targets = data.pin_memory(), [t.pin_memory() for t in targets]
        return {"data": data, "target": targets}
