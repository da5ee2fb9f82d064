"""Row ``encoder``: segment_anything's ``ImageEncoderViT`` block by block (reference) against the same weights
with ``fuse_encoder_attention`` (ours); checks that both give the same taps and neck."""

from typing import List

import torch

from benchmarking.measurement import (BF16_REFERENCE_FACTOR, BF16_TOLERANCE, FP32_TOLERANCE, Variant, add_ratios, autocast,
                                     dtype_name, encoder_dtype, ieee_fp32, measure, relative_error, resident_bytes)
from benchmarking.workload import Setup


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
