"""scripts/benchmark_medsam.py end to end on the CPU with the tiny SAM: every setting runs, the numbers are finite, and
the half-precision weights of checkpoint_final.pth leave the segmentation (nearly) unchanged.

No memory or speed assertions: the figures live in the script's own output.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_medsam.py"


def test_every_setting_runs_and_half_precision_weights_change_almost_no_pixel(tmp_path):
    output = tmp_path / "medsam.json"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--model", "tiny", "--settings", "2:on", "2:off",
               "--patch", "64", "--precision-slices", "1", "--output", str(output)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=SCRIPT.parents[1])
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "MedSAM training step (tiny" in completed.stdout and "nnU-Net's fp16 accumulation" in completed.stdout
    report = json.loads(output.read_text())
    assert report["machine"]["device"] == "cpu" and report["model"] == "tiny"
    assert [(s["batch"], s["checkpointing"]) for s in report["steps"]] == [(2, True), (2, False)]
    for step in report["steps"]:
        assert math.isfinite(step["loss"]) and math.isfinite(step["peak_above_gib"]) and step["seconds"] > 0
    precision = report["precision"]
    assert 0 < precision["max_abs_log_score_difference_fp16_weights"] < 1e-2
    assert precision["pixels_changed_fp16_weights"] < 0.01  # the claim behind checkpoint_final.pth's fp16 weights
