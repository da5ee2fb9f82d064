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
  prompt-shared PDMM for the prompts that pass the gate, prompts in chunks of ``PROMPT_CHUNK_SIZE``; reference =
  ``fused_attention=False, prompt_shared_decoding=False, skip_gated_off_prompts=False`` (PDMM once per prompt and for
  every prompt, as the authors do), all 81 prompts at once.
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
import json
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarking.encoder_row import encoder_row
from benchmarking.grid_inference_row import grid_inference_row
from benchmarking.measurement import log, machine_info
from benchmarking.predict_volume_row import predict_volume_row
from benchmarking.report import RESULTS_FOLDER, format_report, row_summary
from benchmarking.train_step_row import train_step_row
from benchmarking.workload import MODELS, WORKLOADS, Setup
from nnunetv2_desam.environment_variables import positive_int_argument

ROW_FUNCTIONS = {"encoder": encoder_row, "train_step": train_step_row, "grid_inference": grid_inference_row,
                 "predict_volume": predict_volume_row}
ROWS = tuple(ROW_FUNCTIONS)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=MODELS, help="default: vit_h on cuda, small on cpu")
    parser.add_argument("--repeats", type=positive_int_argument, default=5, help="timed calls per variant (default: 5)")
    parser.add_argument("--warmup", type=int, help="untimed calls per variant first (default: 2 on cuda, 1 on cpu)")
    parser.add_argument("--output", type=Path, help="JSON file (default: <repository>/benchmark_results/benchmark_<device>.json)")
    parser.add_argument("--only", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    args.model = args.model or ("vit_h" if cuda else "small")
    args.warmup = max(0, args.warmup if args.warmup is not None else (2 if cuda else 1))
    args.output = args.output or RESULTS_FOLDER / f"benchmark_{args.device}.json"
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
        log(f"row {row} done in {report['rows'][row]['wall_seconds']:.0f} s: " + row_summary(report["rows"][row]))
        report["all_checks_passed"] = all(r.get("checks", {}).get("passed", False) for r in report["rows"].values())
        args.output.write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"\nJSON: {args.output}")
    return 0 if report["all_checks_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
