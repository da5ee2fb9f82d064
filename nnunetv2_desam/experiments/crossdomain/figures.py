"""The experiment's figures: Fig. 3 (Dice vs. grid size, with ``--grid-sizes``) and Fig. 4 (overlays)."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from nnunetv2_desam.experiments import report
from nnunetv2_desam.experiments.crossdomain.datasets import Dataset
from nnunetv2_desam.experiments.crossdomain.experiment import Experiment
from nnunetv2_desam.experiments.crossdomain.methods import DESAM_P
from nnunetv2_desam.experiments.crossdomain.predictions import (collect_results, cross_domain_predictions,
                                                                grid_predictions)


def write_figures(experiment: Experiment) -> None:
    if experiment.grid_sizes:
        write_grid_figure(experiment)
    write_overlays(experiment)


def write_grid_figure(experiment: Experiment) -> None:
    """Fig. 3: DeSAM-P's Dice (mean over targets, stratified bootstrap CI) at every grid size."""
    predictions = [p for k in experiment.grid_sizes for p in grid_predictions(experiment, k)]
    results = collect_results(experiment, predictions, label=lambda p: f"{p.grid_size}×{p.grid_size} grid")
    cis = [results.overall_ci(f"{k}×{k} grid") for k in experiment.grid_sizes]
    report.write_csv(results, str(experiment.output / "dice_vs_grid_size.csv"))
    report.plot_dice_vs_grid_size(experiment.grid_sizes, *zip(*cis), str(experiment.output / "dice_vs_grid_size.png"),
                                  label=f"{experiment.method_names[DESAM_P]}, mean over targets",
                                  protocol=results.protocol, note=experiment.figure_note)
    for k, (mean, low, high) in zip(experiment.grid_sizes, cis):
        print(f"  {k}×{k} grid: Dice {100 * mean:.2f} % [{100 * low:.1f}, {100 * high:.1f}]")


def write_overlays(experiment: Experiment) -> None:
    """Fig. 4: one row per target, its case with the most foreground, as predicted by every trainer."""
    rows = []
    for target in experiment.targets:
        case = most_foreground_case(target)
        predictions = {p.method: str(experiment.prediction_folder(p) / f"{case}{target.file_ending}")
                       for p in cross_domain_predictions(experiment) if p.target == target}
        rows.append(report.OverlayRow(f"{experiment.domain_names[target.name]}\n{case}", str(target.image(case)),
                                      str(target.ground_truth(case)), predictions))
    report.plot_overlays(str(experiment.output / "overlays.png"), rows, classes=experiment.source.labels,
                         note=experiment.figure_note)


def most_foreground_case(dataset: Dataset) -> str:
    """The case whose reference has the most foreground voxels: the most telling one to show."""
    def foreground(case: str) -> int:
        return np.count_nonzero(sitk.GetArrayViewFromImage(sitk.ReadImage(str(dataset.ground_truth(case)))))
    return max(dataset.cases, key=foreground)
