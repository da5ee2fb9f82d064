#!/usr/bin/env python3
"""Time of the SAM fingerprint that every DeSAM network build records: hashed, and read from the cache.

Writes a SAM with random weights in the official layout (segment_anything's ``sam_model_registry``;
ViT-H is 2.56 GB on disk like ``sam_vit_h_4b8939.pth``) into a temporary folder, removed at the end,
and times, each ``--repeats`` times (median):

- ``load_sam_state_dict``: memory-mapped, so it reads little of the file;
- ``sam_fingerprint`` (SHA-256 over every tensor) with the file's pages dropped from the page cache
  first (``posix_fadvise`` DONTNEED; "cold", like the first build after a reboot) and with them cached
  ("warm");
- ``load_sam_state_dict_and_fingerprint`` as ``DeSAM.from_sam_checkpoint`` calls it: with an empty
  fingerprint cache (hashes, writes the entry) and with the entry present (no hashing).

    python scripts/benchmark_sam_fingerprint.py --model vit_h     # needs ~2.6 GB of disk and ~3 GB of memory
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from segment_anything import sam_model_registry

from nnunetv2_desam.networks.fingerprint_cache import load_sam_state_dict_and_fingerprint
from nnunetv2_desam.networks.sam_checkpoint import load_sam_state_dict, sam_fingerprint

REPOSITORY = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def drop_from_page_cache(path: Path) -> None:
    with open(path, "rb") as stream:
        os.posix_fadvise(stream.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def seconds(function, before=lambda: None, repeats: int = 3) -> float:
    """Median wall time of ``function()`` over ``repeats`` runs, ``before()`` untimed ahead of each."""
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model: str, folder: Path, repeats: int) -> dict:
    path = folder / f"sam_{model}_random.pth"
    torch.save(sam_model_registry[model]().state_dict(), path)
    cache_home = folder / "cache"
    cold = lambda: drop_from_page_cache(path)  # noqa: E731
    clear_cache = lambda: [p.unlink() for p in cache_home.rglob("*.json")]  # noqa: E731
    with mock.patch.dict(os.environ, {"XDG_CACHE_HOME": str(cache_home)}):
        rows = {
            "load_sam_state_dict (mmap)": seconds(lambda: load_sam_state_dict(path), cold, repeats),
            "sam_fingerprint, cold page cache": seconds(lambda: sam_fingerprint(load_sam_state_dict(path)), cold, repeats),
            "sam_fingerprint, warm page cache": seconds(lambda: sam_fingerprint(load_sam_state_dict(path)), repeats=repeats),
            "load + fingerprint, empty fingerprint cache": seconds(lambda: load_sam_state_dict_and_fingerprint(path), clear_cache, repeats),
            "load + fingerprint, cached": seconds(lambda: load_sam_state_dict_and_fingerprint(path), repeats=repeats),
        }
    return {"model": model, "file_bytes": path.stat().st_size, "seconds": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("vit_b", "vit_l", "vit_h"), default="vit_h")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, help="where the temporary SAM file goes (default: the system's temp folder)")
    parser.add_argument("--output", type=Path, help="JSON file (default: benchmark_results/sam_fingerprint_<model>.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        result = measure(args.model, Path(folder), args.repeats)
    result["machine"] = {"cpu": cpu_name(), "cpu_count": os.cpu_count(),
                         "torch": torch.__version__, "python": platform.python_version()}
    print(f"{args.model}: {result['file_bytes'] / 1e9:.2f} GB, median of {args.repeats}")
    print("| step | seconds |\n|---|---:|")
    for name, value in result["seconds"].items():
        print(f"| {name} | {value:.3f} |")
    output = args.output or REPOSITORY / "benchmark_results" / f"sam_fingerprint_{args.model}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
