"""Row ``grid_inference``: 9×9-grid inference of one slice, prompt-shared PDMM (ours) against PDMM once per
prompt (reference) and nnU-Net's forward pass; checks that prompt-shared decoding segments identically."""

import torch

from benchmarking.measurement import (FP32_TOLERANCE, Variant, add_ratios, autocast, dtype_name, ieee_fp32, measure,
                                     nnunet_dtype, relative_error, resident_bytes)
from benchmarking.workload import Setup


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
