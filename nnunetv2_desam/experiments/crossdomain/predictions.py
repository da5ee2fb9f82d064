"""Which prediction folders an experiment makes (the table's cells, the grid-size figure's points), and
their scores gathered into a :class:`~nnunetv2_desam.experiments.report.Results`."""
from __future__ import annotations

import json
import math
from typing import Callable, Sequence

from nnunetv2_desam.experiments import report
from nnunetv2_desam.experiments.crossdomain.experiment import PROTOCOLS, Experiment, Prediction
from nnunetv2_desam.experiments.crossdomain.methods import DESAM_P, UPPER_BOUND
from nnunetv2_desam.experiments.scoring import dice_per_case_from_summary

UPPER_BOUND_KEY = "upper_bound"


def grid_size_of(experiment: Experiment, trainer: str) -> int | None:
    return experiment.main_grid_size if experiment.uses_grid(trainer) else None


def cross_domain_predictions(experiment: Experiment) -> list[Prediction]:
    """Every trainer (trained on the source) on every target: the main rows of the table."""
    return [Prediction(f"{trainer}/{target.name}", experiment.method_names[trainer], trainer, experiment.source, target,
                       grid_size_of(experiment, trainer))
            for trainer in experiment.trainers for target in experiment.targets]


def in_domain_predictions(experiment: Experiment) -> list[Prediction]:
    """Every trainer on the source's held-out validation cases: the in-domain column."""
    source = experiment.source
    return [Prediction(f"{trainer}/{source.name}", experiment.method_names[trainer], trainer, source, source,
                       grid_size_of(experiment, trainer), in_domain=True)
            for trainer in experiment.trainers]


def upper_bound_predictions(experiment: Experiment) -> list[Prediction]:
    """The baseline trained on each target, on that target's held-out validation cases."""
    if not experiment.upper_bound:
        return []
    return [Prediction(f"{UPPER_BOUND_KEY}/{target.name}", UPPER_BOUND.name, experiment.baseline, target, target, None,
                       in_domain=True) for target in experiment.targets]


def table_predictions(experiment: Experiment) -> list[Prediction]:
    """The rows of the table: the upper bound (if asked for) first, as in the paper, then the trainers."""
    return upper_bound_predictions(experiment) + in_domain_predictions(experiment) + cross_domain_predictions(experiment)


def grid_predictions(experiment: Experiment, grid_size: int) -> list[Prediction]:
    """DeSAM-P on every target at one grid size; the main predictions where the grid is the same."""
    if grid_size == experiment.main_grid_size:
        return [p for p in cross_domain_predictions(experiment) if p.trainer == DESAM_P]
    return [Prediction(f"grid_size_{grid_size}/{target.name}", f"{grid_size}×{grid_size} grid", DESAM_P,
                       experiment.source, target, grid_size) for target in experiment.targets]


def extra_grid_predictions(experiment: Experiment) -> list[Prediction]:
    return [p for k in experiment.grid_sizes if k != experiment.main_grid_size for p in grid_predictions(experiment, k)]


def read_scores(experiment: Experiment, prediction: Prediction) -> dict:
    """``{case: {class: dice}}`` of a scored prediction folder (NaN where the class is absent from both)."""
    score_file, target = experiment.score_file(prediction), prediction.target
    if experiment.protocol == "whole-volume":
        return dice_per_case_from_summary(str(score_file), target.labels, target.file_ending)
    return {case: {name: math.nan if v is None else v for name, v in per_class.items()}
            for case, per_class in json.loads(score_file.read_text()).items()}


def collect_results(experiment: Experiment, predictions: Sequence[Prediction],
                    label: Callable[[Prediction], str] = lambda prediction: prediction.method) -> report.Results:
    """The scores of ``predictions`` as one Results, rows named by ``label``, columns by target."""
    results = report.Results(PROTOCOLS[experiment.protocol], n_boot=experiment.n_boot, seed=experiment.seed)
    for prediction in predictions:
        on_source = prediction.target == experiment.source
        column = experiment.domain_names[prediction.target.name] + (" (in-domain)" if on_source else "")
        results.add(label(prediction), column, read_scores(experiment, prediction), in_domain=on_source)
    return results
