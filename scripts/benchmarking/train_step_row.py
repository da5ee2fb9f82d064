"""Row ``train_step``: one training step through the trainers' own ``train_step`` (DeSAM fused / reference
attention, nnU-Net's PlainConvUNet); checks that both DeSAMs start with the same loss."""

import math
from typing import Callable

import numpy as np
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
import torch

from benchmarking.measurement import (AUTOCAST_LOSS_TOLERANCE, FP32_TOLERANCE, Variant, add_ratios, dtype_name, measure,
                                     nnunet_dtype, resident_bytes, weights_restored)
from benchmarking.workload import Setup
from nnunetv2_desam.trainers.nnUNetTrainerDeSAM import nnUNetTrainerDeSAM


def dice_and_ce(setup: Setup, weights) -> DeepSupervisionWrapper:
    """nnUNetTrainer._build_loss for a plain-label dataset, outputs weighted by ``weights``."""
    loss = DC_and_CE_loss(
        {"batch_dice": setup.configuration.batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
        weight_ce=1, weight_dice=1, ignore_label=setup.label_manager.ignore_label, dice_class=MemoryEfficientSoftDiceLoss,
    )
    return DeepSupervisionWrapper(loss, weights)


def trainer_step(trainer_class, **attributes) -> Callable[[dict], dict]:
    """``trainer_class.train_step`` of an instance made without ``__init__``.

    A trainer's constructor wants plans files, dataset folders and a log; ``train_step`` only reads the
    attributes given here, so the trainers' own step code is what gets timed.
    """
    trainer = object.__new__(trainer_class)
    vars(trainer).update(attributes)
    return trainer.train_step


def train_step_row(setup: Setup, warmup: int, repeats: int) -> dict:
    device, workload = setup.device, setup.workload
    grad_scaler = lambda: torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    steps, optimizers, networks, batches = {}, {}, {}, {}

    for name in ("reference", "ours"):
        network = networks[name] = getattr(setup, name).train()
        network.decoder.deep_supervision = True
        optimizers[name] = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=1e-4, weight_decay=0)
        steps[name] = trainer_step(
            nnUNetTrainerDeSAM, network=network, optimizer=optimizers[name], grad_scaler=grad_scaler(), device=device,
            loss=dice_and_ce(setup, nnUNetTrainerDeSAM.deep_supervision_weights), label_manager=setup.label_manager,
            prompt_generator=torch.Generator().manual_seed(0),
        )
        batches[name] = setup.training_batch(workload.train_batch, [1.0, 0.5])

    network = networks["nnunet"] = setup.nnunet.train()
    network.decoder.deep_supervision = True
    scales = [float(s[0]) for s in 1 / np.cumprod(np.vstack(setup.configuration.pool_op_kernel_sizes), axis=0)][:-1]
    weights = np.array([1 / 2**i for i in range(len(scales))])
    weights[-1] = 0
    optimizers["nnunet"] = torch.optim.SGD(network.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    steps["nnunet"] = trainer_step(
        nnUNetTrainer, network=network, optimizer=optimizers["nnunet"], grad_scaler=grad_scaler(), device=device,
        loss=dice_and_ce(setup, weights / weights.sum()),
    )
    batches["nnunet"] = setup.training_batch(workload.nnunet_batch, scales)

    losses = {name: [] for name in steps}

    def variant(name: str, description: str) -> Variant:
        run = lambda: losses[name].append(float(steps[name](batches[name])["loss"]))
        return Variant(name, description, run, lambda: resident_bytes(networks[name], optimizers[name]))

    variants = [
        variant("reference", f"nnUNetTrainerDeSAM.train_step, fused_attention=False, batch {workload.train_batch}"),
        variant("ours", f"nnUNetTrainerDeSAM.train_step, fused attention, batch {workload.train_batch}"),
        variant("nnunet", f"nnUNetTrainer.train_step, PlainConvUNet {len(scales) + 1} stages, batch {workload.nnunet_batch}"),
    ]
    with weights_restored(*networks.values()):
        results = measure(variants, device, warmup, repeats)
    add_ratios(results, {"ours": ("reference", "nnunet"), "reference": (None, "nnunet")})

    # Both DeSAMs start from the same weights and draw the same prompts: their first losses agree.
    tolerance = AUTOCAST_LOSS_TOLERANCE if device.type == "cuda" else FP32_TOLERANCE
    first_difference = abs(losses["ours"][0] - losses["reference"][0]) / abs(losses["reference"][0])
    finite = all(math.isfinite(value) for values in losses.values() for value in values)
    checks = {
        "losses_finite": finite,
        "first_loss_ours": losses["ours"][0],
        "first_loss_reference": losses["reference"][0],
        "first_loss_relative_difference": first_difference,
        "passed": finite and first_difference <= tolerance,
    }
    return {
        "dtype": dtype_name(nnunet_dtype(device)), "patch": [workload.patch] * 2, "variants": results, "checks": checks,
    }
