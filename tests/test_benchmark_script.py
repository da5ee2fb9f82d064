"""scripts/benchmark.py end to end on the CPU with the tiny SAM: every row runs and its checks pass.

No timing assertions: the speed targets live in the benchmark's own output, not in the tests.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
ROWS = {
    "encoder": {"reference", "ours"},
    "train_step": {"reference", "ours", "nnunet"},
    "grid_inference": {"reference", "ours", "nnunet"},
    "predict_volume": {"ours", "ours_tta", "nnunet", "nnunet_tta"},
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    output = tmp_path_factory.mktemp("benchmark") / "benchmark.json"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--model", "tiny", "--repeats", "1", "--warmup", "0", "--output", str(output)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=SCRIPT.parents[1])
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "only the ratios mean something" in completed.stdout
    return json.loads(output.read_text())


def test_every_row_and_variant_has_finite_numbers(report):
    assert set(report["rows"]) == set(ROWS)
    for row, variants in ROWS.items():
        results = report["rows"][row]["variants"]
        assert set(results) == variants
        for result in results.values():
            assert math.isfinite(result["median_ms"]) and result["median_ms"] > 0
            assert result["peak_gib"] is None  # not measured on a CPU
            for ratio in ("speedup_vs_reference", "cost_vs_nnunet", "tta_cost_factor"):
                assert math.isfinite(result.get(ratio, 1.0)) and result.get(ratio, 1.0) > 0
    assert "speedup_vs_reference" in report["rows"]["train_step"]["variants"]["ours"]
    assert "cost_vs_nnunet" in report["rows"]["grid_inference"]["variants"]["ours"]
    assert "tta_cost_factor" in report["rows"]["predict_volume"]["variants"]["ours_tta"]


def test_machine_and_model_are_recorded(report):
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"]
    assert report["settings"]["sam_config"]["encoder_embed_dim"] == 32


def test_correctness_checks_passed(report):
    rows = report["rows"]
    assert all(row["checks"]["passed"] for row in rows.values()) and report["all_checks_passed"]
    assert max(rows["encoder"]["checks"]["fp32_error"].values()) <= 1e-4
    grid = rows["grid_inference"]["checks"]
    assert grid["segmentation_identical_shared_vs_per_prompt"] and grid["differing_pixels_shared_vs_per_prompt"] == 0
    assert grid["max_abs_logit_difference_shared_vs_per_prompt"] < 1e-3
    assert grid["relative_error_vs_reference"] <= 1e-4
    assert rows["train_step"]["checks"]["losses_finite"]
    assert rows["predict_volume"]["checks"]["outputs_finite"]


def test_grid_memory_benchmark_compares_chunk_and_batch_sizes_in_fresh_processes(tmp_path):
    output = tmp_path / "grid_memory.json"
    script = SCRIPT.with_name("benchmark_grid_memory.py")
    command = [sys.executable, str(script), "--device", "cpu", "--model", "tiny", "--aggregation", "mean",
               "--settings", "3:9", "3:2", "3:4:3", "--output", str(output)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=SCRIPT.parents[1])
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    first, chunked, batched = json.loads(output.read_text())["results"]
    assert [(r["grid"], r["chunk"], r["batch"], r["rule"]) for r in (first, chunked, batched)] == [(3, 9, 1, "mean"), (3, 2, 1, "mean"), (3, 4, 3, "mean")]
    for result in (chunked, batched):
        assert result["same_segmentation_as_first"] and result["max_abs_difference_vs_first"] < 1e-5
    assert all(r["peak_gib"] >= 0 and r["seconds"] > 0 for r in (first, chunked, batched))
