#!/usr/bin/env python3
"""Does a trained DeSAM-P's IoU gate pass its grid points? IoU outputs inside vs outside each class, measured.

Loads a trained ``nnUNetTrainerDeSAM`` model folder with nnU-Net's predictor, takes evenly spaced slices with
foreground of preprocessed cases (``nnUNet_preprocessed``, the model's plans), each padded or cropped to the patch
size, and prompts every slice with the N×N grid of inference. For each class, the IoU outputs of the grid points
that fall inside that class and of those outside it: their mean and the share above the gate's 0.5. A class whose
inside points stay under 0.5 is deleted by the default gated grid whatever PDMM segments.

    python scripts/gate_probe.py -m $nnUNet_results/Dataset210_AbdomenCT/nnUNetTrainerDeSAM__nnUNetPlans_3mm__2d \\
        -chk checkpoint_latest.pth --cases CT_002 --slices 8
"""

import argparse
import os

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from nnunetv2_desam.environment_variables import positive_int_argument
from nnunetv2_desam.networks.desam import prompt_passes
from nnunetv2_desam.networks.prompts import grid_points


def load_predictor(model_folder: str, checkpoint: str) -> nnUNetPredictor:
    predictor = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=False)
    predictor.initialize_from_trained_model_folder(model_folder, (0,), checkpoint)
    predictor.network.load_state_dict(predictor.list_of_parameters[0])
    predictor.network.eval()
    return predictor


def foreground_slices(predictor: nnUNetPredictor, case: str, count: int):
    """(images S×C×H×W, labels S×H×W) of ``count`` evenly spaced slices with foreground, fitted to the patch."""
    folder = os.path.join(os.environ["nnUNet_preprocessed"], predictor.plans_manager.dataset_name,
                          predictor.configuration_manager.data_identifier)
    image, labels, _, _ = infer_dataset_class(folder)(folder, [case]).load_case(case)
    image, labels = np.asarray(image), np.asarray(labels)[0]
    with_foreground = np.flatnonzero((labels > 0).reshape(len(labels), -1).any(1))
    chosen = with_foreground[np.linspace(0, len(with_foreground) - 1, count).round().astype(int)]
    height, width = predictor.configuration_manager.patch_size
    images = np.zeros((len(chosen), image.shape[0], height, width), np.float32)
    fitted = np.zeros((len(chosen), height, width), labels.dtype)
    h, w = min(height, image.shape[2]), min(width, image.shape[3])
    images[..., :h, :w] = image[:, chosen, :h, :w].transpose(1, 0, 2, 3)
    fitted[:, :h, :w] = labels[chosen, :h, :w]
    return torch.from_numpy(images), fitted


def grid_ious(network, image: torch.Tensor, grid: torch.Tensor) -> np.ndarray:
    """PRIM's IoU outputs P×(K-1) for the P grid points on one C×H×W slice: the encoder and PRIM only, as the
    network's forward runs them, in the same passes of ``prompt_chunk_size`` prompts (PDMM, which the gate decides
    about, is not needed)."""
    ious = []
    with torch.no_grad():
        _, embedding = network.encode_image(image[None])
        sparse, dense, count = network.encode_prompts(1, tuple(image.shape[-2:]), points=grid[None])
        dense_pe = network.prompt_encoder.get_dense_pe()
        for _, prompts in prompt_passes(1, count, network.prompt_chunk_size):
            with network.autocast(image.device):
                ious.append(network.prim(embedding, dense_pe, sparse[prompts], dense[prompts])[1])
    return torch.cat(ious).float().view(len(grid), -1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", required=True, help="the trainer's model folder (holding fold_0)")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_best.pth")
    parser.add_argument("--cases", nargs="+", required=True, help="preprocessed case identifiers")
    parser.add_argument("--slices", type=positive_int_argument, default=8, help="slices with foreground per case")
    parser.add_argument("--grid-size", type=positive_int_argument, default=9)
    args = parser.parse_args()
    predictor = load_predictor(args.model, args.checkpoint)
    num_classes = predictor.label_manager.num_segmentation_heads - 1
    patch = tuple(predictor.configuration_manager.patch_size)
    grid = grid_points(args.grid_size, patch)
    columns, rows = grid[:, 0].long().numpy(), grid[:, 1].long().numpy()
    inside, outside = [[] for _ in range(num_classes)], [[] for _ in range(num_classes)]
    for case in args.cases:
        images, labels = foreground_slices(predictor, case, args.slices)
        for image, label in zip(images, labels):
            iou, hit = grid_ious(predictor.network, image, grid), label[rows, columns]  # P×(K-1), P
            for k in range(num_classes):
                inside[k] += iou[hit == k + 1, k].tolist()
                outside[k] += iou[hit != k + 1, k].tolist()
    print(f"{args.model} ({args.checkpoint}), cases {' '.join(args.cases)}, {args.slices} slices each, "
          f"{args.grid_size}×{args.grid_size} grid: IoU outputs of the points inside / outside each class")
    for k in range(num_classes):
        row = [f"class {k + 1}:"]
        for name, values in (("inside", np.array(inside[k])), ("outside", np.array(outside[k]))):
            summary = f"mean {values.mean():.3f}, {np.mean(values > 0.5):.2f} above 0.5" if len(values) else "none"
            row.append(f"{name} {len(values):4d} points, {summary}")
        print("  ".join(row))


if __name__ == "__main__":
    main()
