"""The benchmark's table: one line per variant, its checks, ratios and the speed targets."""

from pathlib import Path

RESULTS_FOLDER = Path(__file__).resolve().parents[2] / "benchmark_results"
"""Where the scripts write their JSON unless told otherwise (git-ignored)."""
# Speed targets for ViT-H on an H100 (see /work/shared/reference/official-desam.md): (ms, GiB).
TARGETS = {("train_step", "ours"): (200.0, 12.0), ("grid_inference", "ours"): (40.0, None)}


def row_summary(result: dict) -> str:
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
