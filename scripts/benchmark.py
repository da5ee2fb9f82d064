#!/usr/bin/env python3
"""Time DeSAM (ours) against the reference paths and nnU-Net, in one run on one machine.

Rows (each times its variants interleaved, repeat by repeat, and reports medians):

* ``encoder``: SAM's image encoder giving DeSAM's taps (first three global blocks + neck).
  reference = segment_anything's ``ImageEncoderViT`` as the library builds it, run block by block
  (``SAMBackbone`` around the unmodified encoder); ours = the same weights with
  ``fuse_encoder_attention``. Also checks that both give the same taps and neck.
* ``train_step``: one training step with the encoder run online, timed through the trainers' own
  ``train_step`` (``nnUNetTrainerDeSAM``: random point prompt, Dice+CE over [full, half] + 10·MSE(IoU),
  Adam, autocast + GradScaler on CUDA, gradient clipping). ours = ``fused_attention=True``,
  reference = ``fused_attention=False``; baseline = ``nnUNetTrainer.train_step`` on nnU-Net's 2d
  PlainConvUNet (SGD, deep supervision), as nnU-Net plans it for the patch.
* ``grid_inference``: 9×9-grid inference of one slice, encoder included. ours = fused attention +
  prompt-shared PDMM, prompts in chunks of ``PROMPT_CHUNK_SIZE``; reference = ``fused_attention=False,
  prompt_shared_decoding=False`` (PDMM once per prompt, as the authors do), all 81 prompts at once.
  Checks that prompt-shared decoding gives the same segmentation. Baseline: PlainConvUNet forward at
  batch 1.
* ``predict_volume``: nnU-Net's sliding-window prediction (``nnUNetPredictor``) of a volume, test-time
  mirroring off and on (axes 0, 1), for DeSAM and for PlainConvUNet.

Weights are random (nothing is downloaded). Peak memory (CUDA only) is the variant's own: its
weights, gradients and optimizer state plus the peak the call allocates on top, so variants that
stay resident side by side do not count each other. On a CPU only the ratios mean something.

    python scripts/benchmark.py                      # cuda + ViT-H if a GPU is there, else cpu + small
    python scripts/benchmark.py --device cpu --model tiny --repeats 1 --warmup 0   # seconds
"""

import argparse
import io
import json
import math
import platform
import statistics
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext, redirect_stdout
from dataclasses import asdict, dataclass
from functools import cached_property
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from segment_anything import sam_model_registry
from torch import nn

from nnunetv2_desam.experiments.synthetic import DEFAULT_DOMAINS, LABELS, synthetic_case
from nnunetv2_desam.networks.desam import DeSAM, DeSAMSettings
from nnunetv2_desam.networks.sam_checkpoint import SAMConfig, build_sam
from nnunetv2_desam.trainers.nnUNetTrainerDeSAM import nnUNetTrainerDeSAM

REPOSITORY = Path(__file__).resolve().parents[1]
ROWS = ("encoder", "train_step", "grid_inference", "predict_volume")
MODELS = ("tiny", "small", "vit_b", "vit_l", "vit_h")
FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 1e-2
# In bf16 our error against an fp32 run may also be up to this multiple of the reference's own.
BF16_REFERENCE_FACTOR = 1.5
AUTOCAST_LOSS_TOLERANCE = 1e-2
NUM_CLASSES = len(LABELS)
MIRROR_AXES = (0, 1)
GIB = 2**30
# Speed targets for ViT-H on an H100 (see /work/shared/reference/official-desam.md): (ms, GiB).
TARGETS = {("train_step", "ours"): (200.0, 12.0), ("grid_inference", "ours"): (40.0, None)}


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


# ----------------------------------------------------------------------------------------------
# timing, memory, errors


@dataclass
class Variant:
    name: str
    description: str
    run: Callable[[], object]
    resident: Callable[[], int]  # bytes the variant keeps between calls (weights, grads, optimizer)


def timed_call(variant: Variant, device: torch.device):
    """(seconds, peak bytes or None): wall time after a synchronize; on CUDA the variant's own peak memory."""
    if device.type != "cuda":
        start = time.perf_counter()
        variant.run()
        return time.perf_counter() - start, None
    torch.cuda.synchronize(device)
    resident, before = variant.resident(), torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    variant.run()
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return elapsed, resident + torch.cuda.max_memory_allocated(device) - before


def measure(variants: List[Variant], device: torch.device, warmup: int, repeats: int) -> Dict[str, dict]:
    """Warm up, then time every variant once per repeat, interleaved; medians in ms."""
    for _ in range(warmup):
        for variant in variants:
            variant.run()
    times = {v.name: [] for v in variants}
    peaks = {v.name: [] for v in variants}
    for _ in range(repeats):
        for variant in variants:
            seconds, peak = timed_call(variant, device)
            times[variant.name].append(1e3 * seconds)
            peaks[variant.name].append(peak)
    return {
        v.name: {
            "description": v.description,
            "median_ms": statistics.median(times[v.name]),
            "times_ms": times[v.name],
            "peak_gib": None if device.type != "cuda" else max(peaks[v.name]) / GIB,
        }
        for v in variants
    }


def add_ratios(results: Dict[str, dict], pairs: Dict[str, tuple]) -> None:
    """pairs: variant -> (reference or None, nnU-Net baseline or None).

    speedup_vs_reference = reference ms / variant ms; cost_vs_nnunet = variant ms / nnU-Net ms.
    """
    for name, (reference, baseline) in pairs.items():
        ms = results[name]["median_ms"]
        if reference:
            results[name]["speedup_vs_reference"] = results[reference]["median_ms"] / ms
        if baseline:
            results[name]["cost_vs_nnunet"] = ms / results[baseline]["median_ms"]


def resident_bytes(module: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


@contextmanager
def weights_restored(*modules: nn.Module):
    """Undo what training steps did to the modules' weights, so that every row starts from the same ones."""
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
    try:
        yield
    finally:
        for module, state in zip(modules, saved):
            module.load_state_dict(state)
            module.zero_grad(set_to_none=True)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    return name if dtype == torch.float32 else f"{name} autocast"


def encoder_dtype(device: torch.device) -> torch.dtype:
    """bf16 autocast on CUDA, as in the authors' measurement; fp32 on a CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def nnunet_dtype(device: torch.device) -> torch.dtype:
    """What nnU-Net's trainer and predictor run in: torch.autocast("cuda")'s default, fp32 on a CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


@contextmanager
def ieee_fp32():
    """Plain fp32 for the error checks: no TF32 in matmuls or cuDNN convolutions."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------
# what every row uses: networks, nnU-Net plans, synthetic data


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
        log("building DeSAM (fused attention, prompt-shared decoding)")
        torch.manual_seed(0)
        return DeSAM(self.sam_state_dict, 1, NUM_CLASSES).to(self.device)

    @cached_property
    def reference(self) -> DeSAM:
        """segment_anything's attention, PDMM once per prompt, all grid prompts in one pass; the same
        trainable weights as ``ours``."""
        log("building DeSAM (reference paths)")
        network = DeSAM(self.sam_state_dict, 1, NUM_CLASSES, fused_attention=False, prompt_shared_decoding=False,
                        prompt_chunk_size=DeSAMSettings().grid_size ** 2)
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


def log(message: str) -> None:
    print(f"[benchmark] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# rows


def encoder_row(setup: Setup, warmup: int, repeats: int) -> dict:
    device = setup.device
    dtype = encoder_dtype(device)
    reference, ours = setup.reference.image_encoder, setup.ours.image_encoder
    with torch.no_grad():
        images = setup.ours.sam_input(setup.slices(setup.workload.encoder_batch))

    def outputs(encoder, images, dtype) -> List[torch.Tensor]:
        with torch.inference_mode(), autocast(device, dtype):
            taps, neck = encoder(images)
        return [*taps, neck]

    variants = [
        Variant("reference", "segment_anything ImageEncoderViT, block by block", lambda: outputs(reference, images, dtype), lambda: resident_bytes(reference)),
        Variant("ours", "SAMBackbone + fuse_encoder_attention", lambda: outputs(ours, images, dtype), lambda: resident_bytes(ours)),
    ]
    results = measure(variants, device, warmup, repeats)
    add_ratios(results, {"ours": ("reference", None)})

    names = ["tap1", "tap2", "tap3", "neck"]
    errors = lambda actual, expected: {n: relative_error(a, e) for n, a, e in zip(names, actual, expected)}
    few = images[:2]  # the error does not depend on the batch size; keeps the fp32 reference's N×N memory small
    with ieee_fp32():
        reference_fp32 = outputs(reference, few, torch.float32)
        checks = {"fp32_error": errors(outputs(ours, few, torch.float32), reference_fp32)}
        passed = max(checks["fp32_error"].values()) <= FP32_TOLERANCE
        if dtype != torch.float32:
            ours_run, reference_run = outputs(ours, few, dtype), outputs(reference, few, dtype)
            checks["bf16_error"] = errors(ours_run, reference_run)
            checks["bf16_vs_fp32_error_ours"] = errors(ours_run, reference_fp32)
            checks["bf16_vs_fp32_error_reference"] = errors(reference_run, reference_fp32)
            ours_worst = max(checks["bf16_vs_fp32_error_ours"].values())
            reference_worst = max(checks["bf16_vs_fp32_error_reference"].values())
            passed &= ours_worst <= max(BF16_TOLERANCE, BF16_REFERENCE_FACTOR * reference_worst)
    checks["passed"] = bool(passed)
    return {"dtype": dtype_name(dtype), "batch": setup.workload.encoder_batch, "input": list(images.shape), "variants": results, "checks": checks}


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


def grid_inference_row(setup: Setup, warmup: int, repeats: int) -> dict:
    device = setup.device
    dtype = nnunet_dtype(device)
    x = setup.slices(1)
    networks = {"reference": setup.reference, "ours": setup.ours, "nnunet": setup.nnunet}
    for network in networks.values():
        network.eval().decoder.deep_supervision = False

    def predict(network, dtype):
        with torch.inference_mode(), autocast(device, dtype):
            return network(x)

    variants = [
        Variant("reference", "fused_attention=False, PDMM once per prompt", lambda: predict(networks["reference"], dtype), lambda: resident_bytes(networks["reference"])),
        Variant("ours", "fused attention, prompt-shared PDMM", lambda: predict(networks["ours"], dtype), lambda: resident_bytes(networks["ours"])),
        Variant("nnunet", "PlainConvUNet forward, batch 1", lambda: predict(networks["nnunet"], dtype), lambda: resident_bytes(networks["nnunet"])),
    ]
    results = measure(variants, device, warmup, repeats)
    add_ratios(results, {"ours": ("reference", "nnunet"), "reference": (None, "nnunet")})

    with ieee_fp32():
        shared = predict(setup.ours, torch.float32)
        setup.ours.prompt_shared_decoding = False
        per_prompt = predict(setup.ours, torch.float32)
        setup.ours.prompt_shared_decoding = True
        reference = predict(setup.reference, torch.float32)
    differing = (shared.argmax(1) != per_prompt.argmax(1)).sum().item()
    checks = {
        "segmentation_identical_shared_vs_per_prompt": differing == 0,
        "differing_pixels_shared_vs_per_prompt": differing,
        "max_abs_logit_difference_shared_vs_per_prompt": (shared - per_prompt).abs().max().item(),
        "relative_error_vs_reference": relative_error(shared, reference),
        "differing_pixels_vs_reference": (shared.argmax(1) != reference.argmax(1)).sum().item(),
    }
    checks["passed"] = differing == 0 and checks["relative_error_vs_reference"] <= FP32_TOLERANCE
    return {
        "dtype": dtype_name(dtype), "checks_dtype": "float32", "input": list(x.shape),
        "grid": setup.ours.settings.grid_size, "variants": results, "checks": checks,
    }


def predict_volume_row(setup: Setup, warmup: int, repeats: int) -> dict:
    device = setup.device
    volume = setup.volume[0][:, setup.middle(setup.workload.volume_slices)]
    outputs = {}

    def variant(name: str, network: nn.Module, mirroring: bool, description: str) -> Variant:
        network.eval().decoder.deep_supervision = False
        with redirect_stdout(io.StringIO()):  # on a CPU it prints that it cannot work on the device
            predictor = nnUNetPredictor(
                tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring, device=device,
                perform_everything_on_device=device.type == "cuda", allow_tqdm=False,
            )
        predictor.manual_initialization(network, setup.plans, setup.configuration, None, DATASET_JSON, "benchmark", MIRROR_AXES)
        run = lambda: outputs.__setitem__(name, predictor.predict_sliding_window_return_logits(volume))
        return Variant(name, description, run, lambda: resident_bytes(network))

    tta = f"mirroring TTA on axes {MIRROR_AXES}"
    variants = [
        variant("ours", setup.ours, False, "DeSAM (ours), no TTA"),
        variant("ours_tta", setup.ours, True, f"DeSAM (ours), {tta}"),
        variant("nnunet", setup.nnunet, False, "PlainConvUNet, no TTA"),
        variant("nnunet_tta", setup.nnunet, True, f"PlainConvUNet, {tta}"),
    ]
    results = measure(variants, device, warmup, repeats)
    add_ratios(results, {"ours": (None, "nnunet"), "ours_tta": (None, "nnunet_tta")})
    for name in ("ours", "nnunet"):
        results[f"{name}_tta"]["tta_cost_factor"] = results[f"{name}_tta"]["median_ms"] / results[name]["median_ms"]
    expected_shape = (NUM_CLASSES, *volume.shape[1:])
    checks = {
        "outputs_finite": all(bool(torch.isfinite(o).all()) for o in outputs.values()),
        "output_shapes_ok": all(tuple(o.shape) == expected_shape for o in outputs.values()),
    }
    checks["passed"] = checks["outputs_finite"] and checks["output_shapes_ok"]
    return {
        "volume": list(volume.shape), "tiles_per_slice": 1, "tile_step_size": 0.5,
        "dtype": dtype_name(nnunet_dtype(device)), "variants": results, "checks": checks,
    }


ROW_FUNCTIONS = {"encoder": encoder_row, "train_step": train_step_row, "grid_inference": grid_inference_row, "predict_volume": predict_volume_row}


# ----------------------------------------------------------------------------------------------
# report


def machine_info(device: torch.device) -> dict:
    info = {
        "device": device.type,
        "torch": torch.__version__,
        "nnunetv2": version("nnunetv2"),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(device_name=properties.name, gpu_memory_gib=properties.total_memory / GIB,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        info["device_name"] = info["cpu"]
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _row_summary(result: dict) -> str:
    """One line for the progress log, which survives a run that is cut short."""
    if "error" in result:
        return f"FAIL: {result['error']}"
    times = ", ".join(f"{name} {v['median_ms']:.1f} ms" for name, v in result["variants"].items())
    return f"{times}; checks {'ok' if result['checks']['passed'] else 'FAIL'}"


def _check_summary(row: str, checks: dict) -> str:
    verdict = "ok" if checks.get("passed") else "FAIL"
    if row == "encoder":
        text = f"fp32 err {max(checks['fp32_error'].values()):.1e}"
        if "bf16_error" in checks:
            text += (f"; bf16 err {max(checks['bf16_error'].values()):.1e}, vs fp32: ours "
                     f"{max(checks['bf16_vs_fp32_error_ours'].values()):.1e}, ref {max(checks['bf16_vs_fp32_error_reference'].values()):.1e}")
    elif row == "train_step":
        text = f"losses finite: {checks['losses_finite']}; 1st loss ours vs ref {checks['first_loss_relative_difference']:.1e}"
    elif row == "grid_inference":
        text = (f"argmax shared==per-prompt: {checks['segmentation_identical_shared_vs_per_prompt']} "
                f"({checks['differing_pixels_shared_vs_per_prompt']} px), max|dlogit| "
                f"{checks['max_abs_logit_difference_shared_vs_per_prompt']:.1e}; vs ref err {checks['relative_error_vs_reference']:.1e}")
    else:
        text = f"finite: {checks['outputs_finite']}, shapes: {checks['output_shapes_ok']}"
    return f"{verdict}: {text}"


def _target_summary(row: str, name: str, result: dict, applies: bool) -> str:
    target = TARGETS.get((row, name))
    if target is None or not applies:
        return ""
    ms, gib = target
    met = result["median_ms"] <= ms and (gib is None or result["peak_gib"] <= gib)
    limits = f"<={ms:.0f} ms" + (f", <={gib:.0f} GiB" if gib else "")
    return f"target {limits}: {'met' if met else 'MISSED'}"


def format_table(report: dict) -> str:
    header = ("row", "variant", "median ms", "peak GiB", "vs ref", "vs nnU-Net", "checks / notes")
    lines = []
    targets_apply = report["settings"]["device"] == "cuda" and report["settings"]["model"] == "vit_h"
    for row, result in report["rows"].items():
        if "error" in result:
            lines.append((row, "-", "-", "-", "-", "-", f"FAIL: {result['error']}"))
            continue
        for name, v in result["variants"].items():
            notes = [_check_summary(row, result["checks"])] if name == "ours" else []
            if "tta_cost_factor" in v:
                notes.append(f"TTA cost x{v['tta_cost_factor']:.2f}")
            notes.append(_target_summary(row, name, v, targets_apply))
            lines.append((
                row, f"{name}: {v['description']}", f"{v['median_ms']:.1f}",
                "n/a" if v["peak_gib"] is None else f"{v['peak_gib']:.2f}",
                f"{v['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in v else "",
                f"{v['cost_vs_nnunet']:.2f}x" if "cost_vs_nnunet" in v else "",
                "; ".join(n for n in notes if n),
            ))
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header) - 1)]
    render = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]
    rule = "-" * (sum(widths) + 2 * len(widths) + 14)
    return "\n".join([render(header), rule, *map(render, lines)])


def format_report(report: dict) -> str:
    settings, machine = report["settings"], report["machine"]
    sam = settings["sam_config"]
    lines = [
        f"DeSAM benchmark: {machine['device_name']} ({settings['device']}), torch {machine['torch']}, "
        f"model {settings['model']} (embed {sam['encoder_embed_dim']}, depth {sam['encoder_depth']}, "
        f"{sam['encoder_num_heads']} heads, input {sam['img_size']}), workload {settings['workload']}, "
        f"{settings['repeats']} repeats after {settings['warmup']} warm-up, medians",
    ]
    if settings["device"] == "cpu":
        lines.append("CPU run: only the ratios mean something; absolute times and memory are meaningful only on a GPU.")
    for row, result in report["rows"].items():
        if "dtype" in result:
            lines.append(f"  {row}: {result['dtype']}")
    lines += ["", format_table(report), "",
              "vs ref = reference ms / variant ms (speed-up); vs nnU-Net = variant ms / nnU-Net ms (cost multiple)."]
    if settings["device"] == "cuda":
        lines.append("peak GiB = the variant's weights, gradients and optimizer state + what its call allocates on top.")
    lines.append(f"all checks passed: {report['all_checks_passed']}")
    return "\n".join(lines)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=MODELS, help="default: vit_h on cuda, small on cpu")
    parser.add_argument("--repeats", type=int, help="timed calls per variant (default: 5)")
    parser.add_argument("--warmup", type=int, help="untimed calls per variant first (default: 2 on cuda, 1 on cpu)")
    parser.add_argument("--output", type=Path, help="JSON file (default: <repository>/benchmark_results/benchmark_<device>.json)")
    parser.add_argument("--only", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    args.model = args.model or ("vit_h" if cuda else "small")
    args.repeats = max(1, args.repeats if args.repeats is not None else 5)
    args.warmup = max(0, args.warmup if args.warmup is not None else (2 if cuda else 1))
    args.output = args.output or REPOSITORY / "benchmark_results" / f"benchmark_{args.device}.json"
    return args


def main(argv=None) -> int:
    args = parse_arguments(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's training and prediction set it
    workload = WORKLOADS["tiny" if args.model == "tiny" else device.type]
    setup = Setup(args.model, device, workload)
    report = {
        "machine": machine_info(device),
        "settings": {
            "device": device.type, "model": args.model, "repeats": args.repeats, "warmup": args.warmup,
            "workload": asdict(workload), "sam_config": setup.sam_config.to_dict(),
            "note": "networks run eagerly (nnU-Net's trainer would torch.compile on CUDA unless nnUNet_compile=f)",
        },
        "rows": {},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for row in [r for r in ROWS if r in args.only]:
        log(f"row {row}")
        start = time.perf_counter()
        try:
            report["rows"][row] = ROW_FUNCTIONS[row](setup, args.warmup, args.repeats)
        except Exception as error:  # one failing row (e.g. out of memory) must not lose the others
            traceback.print_exc()
            report["rows"][row] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report["rows"][row]["wall_seconds"] = time.perf_counter() - start
        log(f"row {row} done in {report['rows'][row]['wall_seconds']:.0f} s: " + _row_summary(report["rows"][row]))
        report["all_checks_passed"] = all(r.get("checks", {}).get("passed", False) for r in report["rows"].values())
        args.output.write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"\nJSON: {args.output}")
    return 0 if report["all_checks_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
