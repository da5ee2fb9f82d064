#!/usr/bin/env python3
"""MedSAM: peak memory of a training step (batch 8 and 2, gradient checkpointing on/off), and what its
half-precision checkpoint changes in the predictions.

**Memory.** MedSAM fine-tunes SAM's whole image encoder. Each setting runs in a fresh process: MedSAM
from random SAM weights of ``--model``, AdamW and the loss of ``nnUNetTrainerMedSAM``, then one step
of nnU-Net's ``train_step`` on a synthetic batch of ``--patch``² patches with 3 classes. Reported is
the peak during that first step above what the process held just before it (the built network):
gradients, AdamW's moments (created at the first step) and activations. CPU: resident set size, its
peak reset first; CUDA: ``torch.cuda.max_memory_allocated`` (fp16 autocast, as nnU-Net trains).

**Precision.** ``checkpoint_final.pth`` stores MedSAM's weights in fp16. The same network (random
weights, random class offsets) predicts synthetic slices with its fp32 weights and with the weights
rounded to fp16. The yardstick is what nnU-Net's predictor does anyway: it accumulates the network's
outputs in an fp16 array (``predict_from_raw_data.py``), i.e. rounds the fp32 output to fp16.

    python scripts/benchmark_medsam.py --device cpu --model small             # minutes
    python scripts/benchmark_medsam.py --device cpu --model vit_b --settings 2:on 2:off 8:on
    python scripts/benchmark_medsam.py --device cuda --model vit_b
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from benchmarking.measurement import GIB, machine_info, reset_resident_peak, resident_peak_bytes
from benchmarking.report import RESULTS_FOLDER
from benchmarking.workload import MODELS, random_sam_state_dict

from nnunetv2_desam.experiments.synthetic import DEFAULT_DOMAINS, LABELS, synthetic_case
from nnunetv2_desam.networks.medsam import MedSAM
from nnunetv2_desam.trainers.nnUNetTrainerMedSAM import nnUNetTrainerMedSAM

NUM_CLASSES = len(LABELS)


def synthetic_slices(count: int, patch: int):
    """z-scored synthetic slices count×1×P×P and their labels count×1×P×P."""
    image, labels = synthetic_case(DEFAULT_DOMAINS[0], np.random.default_rng(0), shape=(count, patch, patch))
    image = (image - image.mean()) / image.std()
    return torch.from_numpy(image)[:, None], torch.from_numpy(labels.astype(np.int16))[:, None]


def medsam_train_step(network: MedSAM, device: torch.device):
    """``nnUNetTrainerMedSAM.train_step`` (nnU-Net's) with the trainer's optimizer and loss, on an instance made without ``__init__``."""
    trainer = object.__new__(nnUNetTrainerMedSAM)
    vars(trainer).update(network=network, device=device, initial_lr=nnUNetTrainerMedSAM.learning_rate,
                         weight_decay=nnUNetTrainerMedSAM.adamw_weight_decay, is_ddp=False,
                         label_manager=SimpleNamespace(ignore_label=None, num_segmentation_heads=NUM_CLASSES),
                         configuration_manager=SimpleNamespace(batch_dice=True),
                         grad_scaler=torch.amp.GradScaler("cuda") if device.type == "cuda" else None)
    vars(trainer).update(optimizer=trainer.make_optimizer(), loss=trainer._build_loss())
    return trainer.train_step


def measure_step(model: str, device: torch.device, batch: int, checkpointing: bool, patch: int) -> dict:
    """Build MedSAM, run one training step, return the peak memory above the built network; own process."""
    torch.manual_seed(0)
    state_dict = random_sam_state_dict(model)
    network = MedSAM.from_sam_state_dict(state_dict, 1, NUM_CLASSES, gradient_checkpointing=checkpointing).to(device).train()
    del state_dict
    train_step = medsam_train_step(network, device)
    data, target = synthetic_slices(batch, patch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated(device)
    else:
        before = reset_resident_peak()
    start = time.perf_counter()
    loss = train_step({"data": data, "target": target})["loss"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resident_peak_bytes()
    return {"batch": batch, "checkpointing": checkpointing, "seconds": seconds, "held_before_gib": before / GIB,
            "peak_above_gib": (peak - before) / GIB, "loss": float(loss)}


def measure_precision(model: str, device: torch.device, slices: int, patch: int) -> dict:
    """fp32 weights vs fp16-stored weights, and vs nnU-Net's fp16 rounding of the fp32 output."""
    torch.manual_seed(0)
    state_dict = random_sam_state_dict(model)
    network = MedSAM.from_sam_state_dict(state_dict, 1, NUM_CLASSES).to(device).eval()
    with torch.no_grad():
        network.class_prompts.seg_layers.weight.normal_(std=0.5)  # trained offsets differ by class
    stored = {k: v.half() if v.is_floating_point() else v for k, v in network.state_dict().items()}
    half = MedSAM(network.sam_config, 1, NUM_CLASSES).to(device).eval()
    half.load_state_dict(stored)
    x = synthetic_slices(slices, patch)[0].to(device)
    with torch.no_grad():
        reference, from_half = network(x).float(), half(x).float()
    rounded = reference.half().float()
    segmentation = reference.argmax(1)
    return {
        "slices": slices,
        "max_abs_log_score_difference_fp16_weights": (from_half - reference).abs().max().item(),
        "max_abs_probability_difference_fp16_weights": (from_half.softmax(1) - reference.softmax(1)).abs().max().item(),
        "pixels_changed_fp16_weights": (from_half.argmax(1) != segmentation).float().mean().item(),
        "max_abs_log_score_difference_fp16_accumulation": (rounded - reference).abs().max().item(),
        "pixels_changed_fp16_accumulation": (rounded.argmax(1) != segmentation).float().mean().item(),
    }


def run_settings(args) -> list:
    results = []
    for batch, checkpointing in args.settings:
        command = [sys.executable, __file__, "--device", args.device, "--model", args.model, "--patch", str(args.patch),
                   "--one", f"{batch}:{'on' if checkpointing else 'off'}"]
        print(f"batch {batch}, gradient checkpointing {'on' if checkpointing else 'off'} ...", file=sys.stderr, flush=True)
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            reason = (finished.stderr.strip().splitlines() or [f"killed (status {finished.returncode}, out of memory?)"])[-1]
            results.append({"batch": batch, "checkpointing": checkpointing, "error": reason})
            continue
        results.append(json.loads(finished.stdout.strip().splitlines()[-1]))
    return results


def format_tables(report: dict) -> str:
    memory = "peak RSS above the network, GiB" if report["machine"]["device"] == "cpu" else "peak CUDA memory above the network, GiB"
    lines = [f"MedSAM training step ({report['model']}, {report['patch']}² patches, {NUM_CLASSES} classes)",
             f"{'batch':>5}  {'checkpointing':<13} {'seconds':>9} {memory:>38}"]
    for r in report["steps"]:
        switch = "on" if r["checkpointing"] else "off"
        if "error" in r:
            lines.append(f"{r['batch']:>5}  {switch:<13} failed: {r['error']}")
        else:
            lines.append(f"{r['batch']:>5}  {switch:<13} {r['seconds']:>9.1f} {r['peak_above_gib']:>38.2f}")
    p = report.get("precision")
    if p:
        lines += ["", f"fp16-stored weights vs fp32 ({p['slices']} slices)      max |Δ log-score|   pixels whose class changes",
                  f"  fp16 weights (checkpoint_final.pth)       {p['max_abs_log_score_difference_fp16_weights']:>17.1e}   {p['pixels_changed_fp16_weights']:.4%}",
                  f"  nnU-Net's fp16 accumulation of the output {p['max_abs_log_score_difference_fp16_accumulation']:>17.1e}   {p['pixels_changed_fp16_accumulation']:.4%}"]
    return "\n".join(lines)


def setting(text: str) -> tuple:
    batch, switch = text.split(":")
    if switch not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected BATCH:on or BATCH:off, got {text!r}")
    return int(batch), switch == "on"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=MODELS, default="vit_b", help="SAM size, random weights (default: vit_b, MedSAM's)")
    parser.add_argument("--settings", nargs="+", type=setting, default=[(8, True), (8, False), (2, True), (2, False)],
                        metavar="BATCH:on|off", help="batch size and gradient checkpointing (default: 8:on 8:off 2:on 2:off)")
    parser.add_argument("--patch", type=int, default=256, help="nnU-Net patch side; MedSAM resizes it to its input (default: 256)")
    parser.add_argument("--precision-slices", type=int, default=4, help="slices of the precision check, 0 to skip (default: 4)")
    parser.add_argument("--output", type=Path, help="JSON file (default: benchmark_results/medsam_<model>_<device>.json)")
    parser.add_argument("--one", type=setting, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    if args.one:
        print(json.dumps(measure_step(args.model, device, *args.one, args.patch)))
        return 0
    report = {"machine": machine_info(device), "model": args.model, "patch": args.patch, "steps": run_settings(args)}
    if args.precision_slices:
        print("precision check ...", file=sys.stderr, flush=True)
        report["precision"] = measure_precision(args.model, device, args.precision_slices, args.patch)
    output = args.output or RESULTS_FOLDER / f"medsam_{args.model}_{args.device}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(format_tables(report))
    print(f"\nJSON: {output}")
    return 0 if all("error" not in r for r in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
