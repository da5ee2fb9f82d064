"""Row ``predict_volume``: nnU-Net's sliding-window prediction of a volume, test-time mirroring off and on, for
DeSAM and nnU-Net's PlainConvUNet."""

import io
from contextlib import redirect_stdout

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from torch import nn

import torch

from benchmarking.measurement import (Variant, add_ratios, dtype_name, measure, nnunet_dtype, resident_bytes)
from benchmarking.workload import Setup
from benchmarking.workload import DATASET_JSON, NUM_CLASSES

MIRROR_AXES = (0, 1)


def predict_volume_row(setup: Setup, warmup: int, repeats: int) -> dict:
    device = setup.device
    volume = setup.volume[0][:, setup.middle(setup.workload.volume_slices)]
    outputs = {}

    def variant(name: str, network: nn.Module, mirroring: bool, description: str) -> Variant:
        network.eval().decoder.deep_supervision = False
        with redirect_stdout(io.StringIO()):  # on a CPU it prints that it cannot work on the device
            predictor = nnUNetPredictor(
                tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring, device=device,
                perform_everything_on_device=device.type == "cuda", allow_tqdm=False,
            )
        predictor.manual_initialization(network, setup.plans, setup.configuration, None, DATASET_JSON, "benchmark", MIRROR_AXES)
        run = lambda: outputs.__setitem__(name, predictor.predict_sliding_window_return_logits(volume))
        return Variant(name, description, run, lambda: resident_bytes(network))

    tta = f"mirroring TTA on axes {MIRROR_AXES}"
    variants = [
        variant("ours", setup.ours, False, "DeSAM (ours), no TTA"),
        variant("ours_tta", setup.ours, True, f"DeSAM (ours), {tta}"),
        variant("nnunet", setup.nnunet, False, "PlainConvUNet, no TTA"),
        variant("nnunet_tta", setup.nnunet, True, f"PlainConvUNet, {tta}"),
    ]
    results = measure(variants, device, warmup, repeats)
    add_ratios(results, {"ours": (None, "nnunet"), "ours_tta": (None, "nnunet_tta")})
    for name in ("ours", "nnunet"):
        results[f"{name}_tta"]["tta_cost_factor"] = results[f"{name}_tta"]["median_ms"] / results[name]["median_ms"]
    expected_shape = (NUM_CLASSES, *volume.shape[1:])
    checks = {
        "outputs_finite": all(bool(torch.isfinite(o).all()) for o in outputs.values()),
        "output_shapes_ok": all(tuple(o.shape) == expected_shape for o in outputs.values()),
    }
    checks["passed"] = checks["outputs_finite"] and checks["output_shapes_ok"]
    return {
        "volume": list(volume.shape), "tiles_per_slice": 1, "tile_step_size": 0.5,
        "dtype": dtype_name(nnunet_dtype(device)), "variants": results, "checks": checks,
    }
