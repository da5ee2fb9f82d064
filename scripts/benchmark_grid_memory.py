#!/usr/bin/env python3
"""Peak memory and time of grid-prompt inference, by grid size, prompt chunk size and batch size.

DeSAM's per-prompt tensors have a fixed size whatever the slice (PRIM: D×64×64, PDMM: D/4×256×256
for official SAM), so with all N² prompts in one pass memory grows with the grid (fp32 on a CPU,
ViT-B: +2.2 GiB for 5×5, +6.5 GiB for 9×9). ``prompt_chunk_size`` bounds it: it counts
image·prompt pairs per PRIM/PDMM pass across the whole batch, so nnU-Net's validation batch of 8
(setting ``9:27:8``) decodes 27 pairs at a time, not 8 × 27. Each setting runs in a fresh process
with the same random weights and input (image 0 of every batch is the same slice); memory is the
peak above what the process held just before the forward pass (CPU: resident set size, its peak
reset first; CUDA: ``torch.cuda.max_memory_allocated``), so a batch's encoder pass counts too. The
combined log-probabilities of image 0 are compared with those of the first setting of the same grid.

    python scripts/benchmark_grid_memory.py --device cpu                  # ViT-B, about 15 minutes
    python scripts/benchmark_grid_memory.py --device cuda --model vit_h --settings 9:81 9:27 16:256 16:27 9:27:8
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarking.measurement import (GIB, autocast, machine_info, nnunet_dtype, reset_resident_peak,
                                     resident_peak_bytes)
from benchmarking.report import RESULTS_FOLDER
from benchmarking.workload import MODELS, random_sam_state_dict
from nnunetv2_desam.environment_variables import positive_int_argument
from nnunetv2_desam.networks.desam import DeSAM, DeSAMSettings
from nnunetv2_desam.networks.grid_aggregation import GRID_AGGREGATIONS

SLICE = (384, 384)
NUM_CLASSES = 3
TIE_MARGIN = 1e-4


def measure_one(model: str, device: torch.device, rule: str, grid: int, chunk: int, batch: int, logits_path: Path) -> dict:
    """Build, run one forward pass of ``batch`` slices and save image 0's combined log-probabilities; runs in its own process."""
    torch.manual_seed(0)
    state_dict = random_sam_state_dict(model)
    # The encoder in fp32 on every device: runs are compared across chunk and batch sizes, not bf16 rounding.
    network = DeSAM(state_dict, 1, NUM_CLASSES, settings=DeSAMSettings(grid_size=grid, grid_aggregation=rule), prompt_chunk_size=chunk,
                    cpu_bf16=False)
    network = network.to(device).eval()
    network.decoder.deep_supervision = False
    del state_dict
    x = torch.randn(batch, 1, *SLICE, generator=torch.Generator().manual_seed(1)).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated(device)
    else:
        before = reset_resident_peak()
    start = time.perf_counter()
    with torch.inference_mode(), autocast(device, nnunet_dtype(device)):
        logits = network(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resident_peak_bytes()
    torch.save(logits[:1].float().cpu(), logits_path)
    return {"grid": grid, "chunk": chunk, "batch": batch, "rule": network.settings.grid_aggregation,
            "seconds": seconds, "peak_gib": (peak - before) / GIB}


def same_segmentation(logits: torch.Tensor, reference: torch.Tensor) -> bool:
    """Same argmax wherever the reference decides by more than ``TIE_MARGIN`` (random weights give near-ties, which
    float rounding of another batch size may flip)."""
    top_two = reference.topk(2, dim=1).values
    decided = top_two[:, 0] - top_two[:, 1] > TIE_MARGIN
    return bool(torch.equal(logits.argmax(1)[decided], reference.argmax(1)[decided]))


def run_settings(args) -> list:
    results = []
    with tempfile.TemporaryDirectory() as folder:
        first_of_grid = {}
        for grid, chunk, batch in args.settings:
            logits_path = Path(folder) / f"grid{grid}_chunk{chunk}_batch{batch}.pt"
            command = [sys.executable, __file__, "--device", args.device, "--model", args.model, "--aggregation", args.aggregation,
                       "--one", f"{grid}:{chunk}:{batch}", "--logits", str(logits_path)]
            print(f"grid {grid}×{grid}, {chunk} pairs per pass, batch {batch} ...", file=sys.stderr, flush=True)
            finished = subprocess.run(command, capture_output=True, text=True)
            if finished.returncode != 0:
                error = (finished.stderr.strip().splitlines() or ["killed"])[-1]
                results.append({"grid": grid, "chunk": chunk, "batch": batch, "error": error})
                continue
            result = json.loads(finished.stdout.strip().splitlines()[-1])
            logits = torch.load(logits_path)
            if grid in first_of_grid:
                reference = first_of_grid[grid]
                result["max_abs_difference_vs_first"] = (logits - reference).abs().max().item()
                result["same_segmentation_as_first"] = same_segmentation(logits, reference)
            else:
                first_of_grid[grid] = logits
            results.append(result)
    return results


def format_table(results: list, device: str) -> str:
    memory = "peak RSS above the built network, GiB" if device == "cpu" else "peak CUDA memory above the weights, GiB"
    lines = [f"{'grid':<8} {'batch':>5} {'pairs per pass':>14} {'seconds':>9} {memory:>40}  image 0 vs first of grid"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['grid']}×{r['grid']:<6} {r['batch']:>5} {r['chunk']:>14} failed: {r['error']}")
            continue
        same = r.get("same_segmentation_as_first")
        comparison = "(first)" if same is None else f"same segmentation: {same} (max |Δ| {r['max_abs_difference_vs_first']:.1e})"
        lines.append(f"{r['grid']}×{r['grid']:<6} {r['batch']:>5} {r['chunk']:>14} {r['seconds']:>9.1f} {r['peak_gib']:>40.2f}  {comparison}")
    return "\n".join(lines)


def grid_chunk_batch(text: str) -> tuple:
    """GRID:CHUNK or GRID:CHUNK:BATCH (batch 1 by default)."""
    values = [positive_int_argument(v) for v in text.split(":")]
    if len(values) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected GRID:CHUNK[:BATCH], got {text!r}")
    return (*values, 1)[:3]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=MODELS, default="vit_b", help="SAM size, random weights (default: vit_b)")
    parser.add_argument("--aggregation", choices=GRID_AGGREGATIONS, default="gated",
                        help="grid rule (default: gated; with random weights every prompt fails the IoU gate, so "
                        "the comparison of segmentations needs 'mean' to be informative)")
    parser.add_argument("--settings", nargs="+", type=grid_chunk_batch, default=[(9, 81, 1), (9, 27, 1), (9, 9, 1), (16, 27, 1), (9, 27, 8)],
                        metavar="GRID:CHUNK[:BATCH]", help="grid size, image·prompt pairs per pass and batch size "
                        "(default: 9:81 9:27 9:9 16:27 9:27:8)")
    parser.add_argument("--output", type=Path, help="JSON file (default: benchmark_results/grid_memory_<device>.json)")
    parser.add_argument("--one", type=grid_chunk_batch, help=argparse.SUPPRESS)
    parser.add_argument("--logits", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.one:
        print(json.dumps(measure_one(args.model, torch.device(args.device), args.aggregation, *args.one, args.logits)))
        return 0
    results = run_settings(args)
    report = {"machine": machine_info(torch.device(args.device)), "model": args.model, "slice": list(SLICE),
              "aggregation": args.aggregation, "results": results}
    output = args.output or RESULTS_FOLDER / f"grid_memory_{args.device}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(format_table(results, args.device))
    print(f"\nJSON: {output}")
    return 0 if all("error" not in r and r.get("same_segmentation_as_first", True) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
