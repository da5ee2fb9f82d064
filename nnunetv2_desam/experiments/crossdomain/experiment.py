"""An experiment, validated: everything that can be checked before a subprocess runs is checked here.

:func:`build_experiment` resolves the datasets, the rows (:mod:`.methods`), the budget, nnU-Net's model
folders and the subprocess environment, and refuses up front what would fail later: a dataset or trainer
that is not there, a SAM file that is not a SAM checkpoint, a finished training with another budget, a
split file that is not the experiment's. All settings come from an explicit ``environment`` mapping (the
demo passes its own); ``os.environ`` is only lent nnU-Net's variables while nnU-Net looks something up.
"""
from __future__ import annotations

import argparse
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from nnunetv2.utilities.file_path_utilities import get_output_folder

from nnunetv2_desam.environment_variables import (BUDGET_VARIABLES, GRID_SIZE_VARIABLE, grid_aggregation_from_environment, positive_int,
                                                  positive_int_from_environment, sam_checkpoint_path)
from nnunetv2_desam.errors import ExperimentError
from nnunetv2_desam.experiments import report
from nnunetv2_desam.experiments.crossdomain.datasets import Dataset, check_splittable, check_targets, resolve_dataset
from nnunetv2_desam.experiments.crossdomain.methods import (ABLATION_ROWS, DEFAULT_ROWS, DESAM_P, METHODS, UPPER_BOUND,
                                                            display_names, find_trainer_class, honours_budget,
                                                            needs_sam_checkpoint, paper_name, select_methods,
                                                            uses_point_grid)
from nnunetv2_desam.experiments.splits import SPLITS_FILE, holds_source_split
from nnunetv2_desam.networks.desam import DeSAMSettings
from nnunetv2_desam.networks.sam_checkpoint import SAMConfig, load_sam_state_dict
from nnunetv2_desam.trainer_search_path import environment_with_trainers

CONFIGURATION = "2d"
FOLD = 0
DEFAULT_PLANS = "nnUNetPlans"  # what nnUNetv2_plan_and_preprocess writes
CHECKPOINT = "checkpoint_best.pth"
PROTOCOLS = {"whole-volume": report.PROTOCOL_WHOLE_VOLUME, "foreground-slices": report.PROTOCOL_FOREGROUND_SLICES}
SCORE_FILES = {"whole-volume": "summary.json", "foreground-slices": "foreground_slices.json"}
NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
BUDGET_OPTIONS = {  # command-line option -> trainer attribute (its variable: BUDGET_VARIABLES)
    "epochs": "num_epochs",
    "iterations_per_epoch": "num_iterations_per_epoch",
    "val_iterations": "num_val_iterations_per_epoch",
}


@dataclass(frozen=True)
class Prediction:
    """One prediction folder: ``trainer`` trained on ``model_dataset`` applied to ``target``.

    ``in_domain`` marks a model applied to the held-out validation cases of the dataset it was trained
    on: the source (in-domain column) or, for the upper bound, a target. ``grid_size`` is the
    DESAM_GRID_SIZE it is made with, None where the grid does not matter (no point prompts).
    """

    key: str
    method: str
    trainer: str
    model_dataset: Dataset
    target: Dataset
    grid_size: int | None
    in_domain: bool = False


@dataclass
class Experiment:
    """Everything the steps need, validated: datasets, trainers, folders and subprocess environment.

    ``notes`` go under the table's title, ``figure_note`` onto every figure (the demo's disclaimer);
    ``skipped`` names the rows of a requested paper table whose trainer is not installed.
    """

    source: Dataset
    targets: list[Dataset]
    trainers: list[str]
    baseline: str
    upper_bound: bool
    protocol: str
    grid_sizes: list[int]
    main_grid_size: int
    grid_aggregation: str
    budget: dict[str, int]
    output: Path
    device: str
    plans: str
    split_seed: int
    overwrite_split: bool
    seed: int
    n_boot: int
    environment: dict[str, str]
    model_folders: dict[tuple[str, str], Path]
    trainer_classes: dict[str, type]
    method_names: dict[str, str]
    domain_names: dict[str, str]
    notes: tuple[str, ...] = ()
    figure_note: str = ""
    skipped: tuple[str, ...] = ()

    @property
    def preprocessed(self) -> Path:
        return Path(self.environment["nnUNet_preprocessed"])

    @property
    def processes(self) -> str:
        return self.environment["nnUNet_def_n_proc"]

    def uses_grid(self, trainer: str) -> bool:
        """Whether ``trainer`` predicts with the point grid (DESAM_GRID_SIZE)."""
        return uses_point_grid(self.trainer_classes[trainer])

    def model_folder(self, dataset: Dataset, trainer: str) -> Path:
        """nnU-Net's fold folder of ``trainer`` trained on ``dataset``."""
        return self.model_folders[(dataset.name, trainer)]

    def split_file(self, dataset: Dataset) -> Path:
        return self.preprocessed / dataset.name / SPLITS_FILE

    def prediction_folder(self, prediction: Prediction) -> Path:
        return self.output / "predictions" / prediction.key

    def score_file(self, prediction: Prediction) -> Path:
        return self.output / "scores" / prediction.key / SCORE_FILES[self.protocol]

    def input_folder(self, prediction: Prediction) -> Path:
        """The images to predict: the target's ``imagesTr``, or a copy of its validation cases (in-domain)."""
        if prediction.in_domain:
            return self.output / "validation_inputs" / prediction.target.name
        return prediction.target.folder / "imagesTr"

    def cases(self, prediction: Prediction) -> list[str]:
        """Every target case, or (in-domain) the validation cases of the target's own split."""
        if not prediction.in_domain:
            return list(prediction.target.cases)
        return json.loads(self.split_file(prediction.target).read_text())[FOLD]["val"]

    def trained_models(self) -> list[tuple[Dataset, str]]:
        """(dataset, trainer) of every training: the trainers on the source, the upper bound on each target."""
        models = [(self.source, trainer) for trainer in self.trainers]
        return models + ([(target, self.baseline) for target in self.targets] if self.upper_bound else [])


@contextmanager
def lent_to_os_environ(environment: Mapping[str, str], names: Sequence[str] = (*NNUNET_FOLDERS, "nnUNet_extTrainer")):
    """nnU-Net reads its folders and nnUNet_extTrainer from os.environ when it looks something up; lend it the
    experiment's values for that lookup only."""
    previous = {name: os.environ.get(name) for name in names}
    os.environ.update({name: environment[name] for name in names if name in environment})
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def build_experiment(args: argparse.Namespace, environment: Mapping[str, str], notes: Sequence[str] = (),
                     figure_note: str = "") -> Experiment:
    """Check everything that can be checked before a subprocess runs, and resolve the settings."""
    missing = [name for name in NNUNET_FOLDERS if not environment.get(name)]
    if missing:
        raise ExperimentError(f"environment variable(s) {', '.join(missing)} not set: point them at nnU-Net's "
                              f"raw, preprocessed and results folders")
    environment = environment_with_trainers(environment)
    environment.setdefault("nnUNet_def_n_proc", str(min(8, os.cpu_count() or 1)))
    positive_int(environment["nnUNet_def_n_proc"], "nnUNet_def_n_proc")
    environment["PYTHONUNBUFFERED"] = "1"
    budget = resolve_budget(args, environment)
    environment.update({BUDGET_VARIABLES[attribute]: str(value) for attribute, value in budget.items()})
    raw = Path(environment["nnUNet_raw"])
    with lent_to_os_environ(environment):
        source = resolve_dataset(args.source, raw)
        targets = [resolve_dataset(target, raw) for target in args.targets]
        trainers, upper_bound, skipped = resolve_rows(args, bool(budget))
        baseline = METHODS["baseline"].trainer_for(bool(budget))
        classes = {trainer: trainer_class(trainer) for trainer in [*trainers, baseline]}
        models = [(source, trainer) for trainer in trainers] + [(target, baseline) for target in targets if upper_bound]
        model_folders = {(dataset.name, trainer): Path(get_output_folder(dataset.name, trainer, args.plans, CONFIGURATION, FOLD))
                         for dataset, trainer in models}
    check_targets(source, targets)
    check_splittable([source, *(targets if upper_bound else [])], args.split_seed)
    check_custom_plans(args.plans, [source, *(targets if upper_bound else [])], Path(environment["nnUNet_preprocessed"]))
    if not trainers:
        raise ExperimentError("no trainer to run: name methods (--methods) or trainers (-tr)")
    if args.grid_sizes and DESAM_P not in trainers:
        raise ExperimentError(f"--grid-sizes needs DeSAM-P ({DESAM_P}) among the trainers")
    if any(needs_sam_checkpoint(classes[trainer]) for trainer in trainers):
        check_sam_checkpoint(environment)
    experiment = Experiment(
        source=source, targets=targets, trainers=trainers, baseline=baseline, upper_bound=upper_bound,
        protocol=args.protocol, grid_sizes=sorted(set(args.grid_sizes or [])),
        main_grid_size=main_grid_size(environment),
        grid_aggregation=grid_aggregation_from_environment(DeSAMSettings.grid_aggregation, environment), budget=budget,
        output=(args.output or Path(f"crossdomain_{source.name}")).resolve(),
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), plans=args.plans, split_seed=args.split_seed,
        overwrite_split=args.overwrite_split, seed=args.seed, n_boot=args.n_boot, environment=environment,
        model_folders=model_folders, trainer_classes=classes, method_names=display_names(trainers, paper_name),
        domain_names=display_names([source.name, *(target.name for target in targets)],
                                   lambda name: name.split("_", 1)[1]),
        notes=tuple(notes), figure_note=figure_note, skipped=tuple(skipped),
    )
    check_finished_budgets(experiment, classes)
    check_existing_splits(experiment)
    return experiment


def check_custom_plans(plans: str, trained: Sequence[Dataset], preprocessed: Path) -> None:
    """Plans other than nnU-Net's default are the user's (nnUNetv2_plan_experiment -overwrite_plans_name): they must
    exist for every dataset that is trained on; the command preprocesses with them but does not plan them."""
    if plans == DEFAULT_PLANS:
        return
    for dataset in trained:
        path = preprocessed / dataset.name / f"{plans}.json"
        if not path.is_file():
            raise ExperimentError(
                f"plans {plans} not found: {path} is missing. Plan them first, e.g. nnUNetv2_plan_and_preprocess -d "
                f"{dataset.dataset_id} -c {CONFIGURATION}, then nnUNetv2_plan_experiment -d {dataset.dataset_id} "
                f"-overwrite_plans_name {plans} with the settings you want (-overwrite_target_spacing, -gpu_memory_target, ...)"
            )


def resolve_rows(args: argparse.Namespace, budget: bool) -> tuple[list[str], bool, list[str]]:
    """(trainers in table order, whether the upper bound is a row, rows of a paper table left out).

    ``--methods`` first, then ``-tr``, then ``--ablations``; without ``--methods`` and ``-tr`` the default
    rows. A method named on its own must be installed; one that comes with a whole table (``table2``) is
    left out with a note when its trainer is not.
    """
    if args.methods:
        rows = select_methods(args.methods)
    else:
        rows = [] if args.trainers else [(METHODS[key], True) for key in DEFAULT_ROWS]
    trainers, upper_bound, skipped = [], args.upper_bound, []
    for method, named in rows:
        if method is UPPER_BOUND:
            upper_bound = True
            continue
        trainer = method.trainer_for(budget)
        if find_trainer_class(trainer) is not None:
            trainers.append(trainer)
        elif named:
            raise ExperimentError(f"method {method.key} ({method.name}): its trainer {trainer} is not installed "
                                  f"(not in nnunetv2_desam, nnunetv2 or the folders of nnUNet_extTrainer)")
        else:
            skipped.append(f"{method.name} ({trainer} is not installed)")
    trainers += args.trainers or []
    trainers += [METHODS[key].trainer for key in ABLATION_ROWS] if args.ablations else []
    return list(dict.fromkeys(trainers)), upper_bound, skipped


def trainer_class(trainer: str) -> type:
    cls = find_trainer_class(trainer)
    if cls is None:
        raise ExperimentError(f"unknown trainer {trainer!r}: not in nnunetv2_desam, nnunetv2 or the folders "
                              f"of nnUNet_extTrainer")
    return cls


def resolve_budget(args: argparse.Namespace, environment: Mapping[str, str]) -> dict[str, int]:
    """``{trainer attribute: value}`` of the budget: the options, else DESAM_* already in the environment."""
    budget = {}
    for option, attribute in BUDGET_OPTIONS.items():
        value = getattr(args, option)
        if value is None:
            value = positive_int_from_environment(BUDGET_VARIABLES[attribute], environment)
        if value is not None:
            budget[attribute] = value
    return budget


def check_sam_checkpoint(environment: Mapping[str, str]) -> None:
    """The SAM file must be a SAM checkpoint before the first step runs. The file is memory-mapped, so checking
    its keys reads its index, not its 0.4-2.5 GB of weights."""
    SAMConfig.from_state_dict(load_sam_state_dict(sam_checkpoint_path(environment)))  # refuses what the trainers cannot build


def main_grid_size(environment: Mapping[str, str]) -> int:
    """The grid DeSAM-P predicts with: DESAM_GRID_SIZE, else the paper's 9×9."""
    return positive_int_from_environment(GRID_SIZE_VARIABLE, environment) or DeSAMSettings.grid_size


def training_record(folder: Path) -> dict:
    """Budget, batch size and initial learning rate (``initial_lr``) nnU-Net recorded in ``debug.json`` when the
    training started; {} if absent."""
    try:
        debug = json.loads((folder / "debug.json").read_text())
    except (OSError, ValueError):
        return {}
    keys = [*BUDGET_VARIABLES, "batch_size"]
    record = {key: int(debug[key]) for key in keys if str(debug.get(key, "")).isdigit()}
    try:
        record["initial_lr"] = float(debug["initial_lr"])
    except (KeyError, TypeError, ValueError):
        pass
    return record


def check_finished_budgets(experiment: Experiment, classes: Mapping[str, type]) -> None:
    """A finished training is reused only if it had the budget asked for; refuse a mismatch up front."""
    for dataset, trainer in experiment.trained_models():
        folder = experiment.model_folder(dataset, trainer)
        if not (folder / "checkpoint_final.pth").is_file() or not honours_budget(classes[trainer]):
            continue
        record = training_record(folder)
        for attribute, value in experiment.budget.items():
            if attribute in record and record[attribute] != value:
                raise ExperimentError(f"{folder} finished with {attribute}={record[attribute]}, but {value} was asked "
                                      f"for; remove that folder to retrain, or use another nnUNet_results")


def check_existing_splits(experiment: Experiment) -> None:
    """A split file other than the experiment's 9:1 split (nnU-Net's 5-fold split from an earlier nnUNetv2_train,
    another --split-seed) is replaced only with --overwrite-split, and then not under a finished training of
    this experiment, which would otherwise be reused although it learnt from the other split."""
    models = experiment.trained_models()
    for dataset in {dataset.name: dataset for dataset, _ in models}.values():
        trainers = [trainer for model_dataset, trainer in models if model_dataset == dataset]
        split_file = experiment.split_file(dataset)
        if not split_file.is_file() or holds_source_split(split_file, dataset.cases, experiment.split_seed):
            continue
        if not experiment.overwrite_split:
            raise ExperimentError(other_split_message(experiment, dataset))
        stale = [str(folder) for folder in (experiment.model_folder(dataset, trainer) for trainer in trainers)
                 if any(folder.glob("checkpoint_*.pth"))]
        if stale:
            raise ExperimentError(f"--overwrite-split: {', '.join(stale)} learnt from the old split of {dataset.name} "
                                  f"and would be reused; move or remove it first, or use another nnUNet_results")



def other_split_message(experiment: Experiment, dataset: Dataset) -> str:
    """The way out of a split file that is not the experiment's, and what taking it costs."""
    return (f"{experiment.split_file(dataset)} holds another split than this experiment's 9:1 split (seed "
            f"{experiment.split_seed}), e.g. nnU-Net's 5-fold split from an earlier nnUNetv2_train; rerun with "
            f"--overwrite-split to replace it. Models trained on {dataset.name} with the old split (any trainer, any "
            f"fold) are then no longer valid: their validation cases may be training cases of the new split")
