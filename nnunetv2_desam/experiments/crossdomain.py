"""``nnUNetv2_desam_crossdomain``: DeSAM's cross-domain experiment in one command, on nnU-Net's own tools.

The paper's protocol (Sec. 4.1): split one source domain 9:1 into training and in-domain
validation, keep the best model on the in-domain validation split, and test it on every case of
every other (target) domain. Each step is a subprocess of the real console command, so what runs
is exactly what a user would type by hand:

1. ``nnUNetv2_plan_and_preprocess -d SOURCE -c 2d`` and the 9:1 split (:func:`splits.write_source_split`)
2. ``nnUNetv2_train SOURCE 2d 0 -tr TRAINER`` for every trainer (``--c`` resumes an interrupted one)
3. ``nnUNetv2_predict -chk checkpoint_best.pth`` on every target's ``imagesTr``, and on the source's
   held-out validation cases (the in-domain column: how much of the Dice the domain shift costs)
4. ``nnUNetv2_evaluate_folder`` against the ``labelsTr`` (or the paper's foreground-slice Dice)
5. the Table 2-style report, Fig. 3 (Dice vs. grid size) and Fig. 4 (overlays)

Resumable: a step whose outputs exist prints "skipped (done)". A prediction folder carries a
stamp naming the checkpoint (and its modification time) and the grid size it was made with, so
retraining or another grid size redoes the prediction; predicting again deletes its scores.
All settings come from an explicit ``environment`` mapping (the demo passes its own); this
process's ``os.environ`` is only lent ``nnUNet_extTrainer`` while a trainer class is looked up.
"""
from __future__ import annotations

import argparse
import codecs
import importlib
import json
import math
import os
import pkgutil
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from functools import lru_cache
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

from nnunetv2_desam.experiments import report
from nnunetv2_desam.experiments.scoring import dice_per_case_from_summary, score_folder_foreground_slices
from nnunetv2_desam.experiments.splits import (DEFAULT_SEED, SPLITS_FILE, SplitError,
                                               compute_source_split, write_source_split)
from nnunetv2_desam.networks.desam import DeSAMSettings
from nnunetv2_desam.console import run_console_command
from nnunetv2_desam.environment_variables import (BUDGET_VARIABLES, GRID_SIZE_VARIABLE, SAM_CHECKPOINT_VARIABLE,
                                                  positive_int, positive_int_from_environment)
from nnunetv2_desam.errors import ConfigurationError, ExperimentError, StepFailed
from nnunetv2_desam.trainer_search_path import environment_with_trainers
from nnunetv2_desam.trainers.nnUNetTrainerBudget import nnUNetTrainerBudget
from nnunetv2_desam.trainers.nnUNetTrainerDeSAM import nnUNetTrainerDeSAM
from nnunetv2_desam import trainers as trainers_package

PROG = "nnUNetv2_desam_crossdomain"
CONFIGURATION = "2d"
FOLD = 0
PLANS = "nnUNetPlans"
CHECKPOINT = "checkpoint_best.pth"
BASELINE = "nnUNetTrainer"
BUDGET_BASELINE = "nnUNetTrainerBudget"
DESAM_B = "nnUNetTrainerDeSAM_Box"
DESAM_P = "nnUNetTrainerDeSAM"
ABLATIONS = ("nnUNetTrainerDeSAM_PDMMOnly", "nnUNetTrainerDeSAM_NoIoUHead", "nnUNetTrainerDeSAM_NoMEF")
METHOD_NAMES = {
    BASELINE: "Baseline",
    BUDGET_BASELINE: "Baseline",
    DESAM_B: "DeSAM-B",
    DESAM_P: "DeSAM-P",
    "nnUNetTrainerDeSAM_PDMMOnly": "PDMM only",
    "nnUNetTrainerDeSAM_NoIoUHead": "no IoU head",
    "nnUNetTrainerDeSAM_NoMEF": "no MEF",
}
PROTOCOLS = {"whole-volume": report.PROTOCOL_WHOLE_VOLUME, "foreground-slices": report.PROTOCOL_FOREGROUND_SLICES}
SCORE_FILES = {"whole-volume": "summary.json", "foreground-slices": "foreground_slices.json"}
NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
BUDGET_OPTIONS = {  # command-line option -> trainer attribute (its variable: BUDGET_VARIABLES)
    "epochs": "num_epochs",
    "iterations_per_epoch": "num_iterations_per_epoch",
    "val_iterations": "num_val_iterations_per_epoch",
}
STAMP_FILE = "desam_prediction.json"
UPPER_BOUND_KEY = "upper_bound"
UPPER_BOUND_NAME = "Upper bound"


@dataclass(frozen=True)
class Dataset:
    """An nnU-Net raw dataset as the experiment uses it: cases of ``imagesTr`` with their ``labelsTr``."""

    name: str
    folder: Path
    labels: dict[str, int]
    file_ending: str
    num_channels: int
    cases: tuple[str, ...]

    @property
    def dataset_id(self) -> int:
        return int(self.name[len("Dataset"):].split("_", 1)[0])

    def image(self, case: str) -> Path:
        return self.folder / "imagesTr" / f"{case}_0000{self.file_ending}"

    def ground_truth(self, case: str) -> Path:
        return self.folder / "labelsTr" / f"{case}{self.file_ending}"


@dataclass(frozen=True)
class Prediction:
    """One prediction folder: ``trainer`` trained on ``model_dataset`` applied to ``target``.

    ``in_domain`` marks a model applied to the held-out validation cases of the dataset it was
    trained on: the source (in-domain column) or, for the upper bound, a target. ``grid_size`` is the DESAM_GRID_SIZE it is made
    with, None where the grid does not matter (no point prompts).
    """

    key: str
    method: str
    trainer: str
    model_dataset: Dataset
    target: Dataset
    grid_size: int | None
    in_domain: bool = False


@dataclass(frozen=True)
class Step:
    """One unit of work: ``done`` says whether its outputs already exist, ``run`` makes them."""

    title: str
    run: Callable[[], None]
    done: Callable[[], bool] = lambda: False


@dataclass
class Experiment:
    """Everything the steps need, validated: datasets, trainers, folders and subprocess environment."""

    source: Dataset
    targets: list[Dataset]
    trainers: list[str]
    baseline: str
    upper_bound: bool
    protocol: str
    grid_sizes: list[int]
    main_grid_size: int
    budget: dict[str, int]
    output: Path
    device: str
    split_seed: int
    seed: int
    n_boot: int
    environment: dict[str, str]
    notes: tuple[str, ...]
    method_names: dict[str, str]
    domain_names: dict[str, str]

    @property
    def preprocessed(self) -> Path:
        return Path(self.environment["nnUNet_preprocessed"])

    @property
    def processes(self) -> str:
        return self.environment["nnUNet_def_n_proc"]

    def model_folder(self, dataset: Dataset, trainer: str) -> Path:
        """nnU-Net's fold folder of ``trainer`` trained on ``dataset``."""
        return (Path(self.environment["nnUNet_results"]) / dataset.name / f"{trainer}__{PLANS}__{CONFIGURATION}"
                / f"fold_{FOLD}")

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
        splits = json.loads((self.preprocessed / prediction.target.name / SPLITS_FILE).read_text())
        return splits[FOLD]["val"]


def display_names(names: Sequence[str], short: Callable[[str], str]) -> dict[str, str]:
    """``{name: short name}`` for tables and figures (the paper's "DeSAM-P", "SiteB"); a short name two
    names would share falls back to the full name. The report's notes map them back."""
    shorts = [short(name) for name in names]
    return {name: abbreviation if shorts.count(abbreviation) == 1 else name for name, abbreviation in zip(names, shorts)}


# ----------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""DeSAM's single-source cross-domain experiment (paper Table 2, Fig. 3, Fig. 4) with
nnU-Net's own commands: preprocess the source (2d) and split it 9:1 into training and in-domain
validation; train every trainer on fold 0; predict every case of each target with the best
checkpoint on the in-domain validation split (checkpoint_best.pth); score; write the report.
Rerunning the same command resumes: finished steps print 'skipped (done)'.""",
        epilog="""environment variables:
  nnUNet_raw, nnUNet_preprocessed, nnUNet_results   required (nnU-Net's folders); source and targets
                        must be nnU-Net raw datasets in nnUNet_raw with identical labels
  DESAM_SAM_CHECKPOINT  official SAM checkpoint file; required when a DeSAM trainer is run
  DESAM_GRID_SIZE       points per side of DeSAM-P's inference grid (default 9)
  DESAM_EPOCHS, DESAM_ITERATIONS_PER_EPOCH, DESAM_VAL_ITERATIONS_PER_EPOCH
                        training budget, as --epochs, --iterations-per-epoch, --val-iterations
                        (the options win)
  nnUNet_def_n_proc     worker processes of nnU-Net's preprocessing, validation export and
                        evaluation; set to min(8, CPU count) when unset (nnU-Net's default, 8,
                        is slow on small machines)
  nnUNet_n_proc_DA, nnUNet_compile   passed on to nnU-Net (nnUNet_n_proc_DA=0, fine for training,
                        becomes 1 for planning, which rejects 0)
  nnUNet_extTrainer     this package's trainer folder is added for the subprocesses

output folder:
  table.md, table.csv, per_case.json, dice_bar_chart.png   Table 2: Dice per target and overall
  overlays.png          Fig. 4: one row per target (image, ground truth, every method)
  dice_vs_grid_size.png, dice_vs_grid_size.csv             Fig. 3 (with --grid-sizes)
  predictions/, scores/, logs/   per-step outputs; logs/ holds every subprocess's output

Datasets are given by id (901) or name (Dataset901_SiteA).""",
    )
    parser.add_argument("-s", "--source", required=True, help="source dataset (training), id or name")
    parser.add_argument("-t", "--targets", required=True, nargs="+", metavar="TARGET", help="target datasets (testing only)")
    parser.add_argument("-tr", "--trainers", nargs="+", metavar="TRAINER",
                        help=f"nnU-Net trainer classes to compare, in table order (default: the baseline, "
                             f"{DESAM_B} (DeSAM-B), {DESAM_P} (DeSAM-P)). The baseline is {BASELINE}, or "
                             f"{BUDGET_BASELINE} (the same trainer honouring the budget) when a budget is given")
    parser.add_argument("--ablations", action="store_true",
                        help=f"also train the paper's Table 1 ablations: {', '.join(ABLATIONS)}")
    parser.add_argument("--upper-bound", action="store_true",
                        help="also train the baseline on each target (its own 9:1 split) and score it on that "
                             "target's held-out validation cases: the 'Upper bound' row of Table 2")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="whole-volume",
                        help="whole-volume: nnU-Net's evaluation (nnUNetv2_evaluate_folder), every slice (default); "
                             "foreground-slices: the paper's protocol, Dice over the slices with reference foreground")
    parser.add_argument("--grid-sizes", nargs="+", type=_positive_int, metavar="K",
                        help=f"also predict every target with DeSAM-P ({DESAM_P}) at DESAM_GRID_SIZE=K for each K "
                             f"and plot Dice vs. grid size (Fig. 3), e.g. 3 5 9 16")
    parser.add_argument("--epochs", type=_positive_int, help="training epochs (sets DESAM_EPOCHS)")
    parser.add_argument("--iterations-per-epoch", type=_positive_int,
                        help="training iterations per epoch (sets DESAM_ITERATIONS_PER_EPOCH)")
    parser.add_argument("--val-iterations", type=_positive_int,
                        help="validation iterations per epoch (sets DESAM_VAL_ITERATIONS_PER_EPOCH)")
    parser.add_argument("-o", "--output", type=Path,
                        help="output folder (default: ./crossdomain_<source dataset name>)")
    parser.add_argument("-device", "--device", choices=("cuda", "cpu", "mps"),
                        help="device for training and prediction (default: cuda when available, else cpu)")
    parser.add_argument("--split-seed", type=int, default=DEFAULT_SEED,
                        help=f"seed of the 9:1 source split (default {DEFAULT_SEED}, nnU-Net's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap confidence intervals (default 0)")
    parser.add_argument("--n-boot", type=_positive_int, default=1000,
                        help="bootstrap resamples of the confidence intervals (default 1000)")
    return parser


def _positive_int(text: str) -> int:
    try:
        return positive_int(text, "the value")
    except ConfigurationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_experiment(args: argparse.Namespace, environment: Mapping[str, str], notes: Sequence[str] = ()) -> Experiment:
    """Check everything that can be checked before a subprocess runs, and resolve the settings."""
    missing = [name for name in NNUNET_FOLDERS if not environment.get(name)]
    if missing:
        raise ExperimentError(f"environment variable(s) {', '.join(missing)} not set: point them at nnU-Net's "
                              f"raw, preprocessed and results folders")
    environment = environment_with_trainers(environment)
    environment.setdefault("nnUNet_def_n_proc", str(min(8, os.cpu_count() or 1)))
    positive_int(environment["nnUNet_def_n_proc"], "nnUNet_def_n_proc")
    environment["PYTHONUNBUFFERED"] = "1"
    raw = Path(environment["nnUNet_raw"])
    source = resolve_dataset(args.source, raw)
    targets = [resolve_dataset(target, raw) for target in args.targets]
    check_targets(source, targets)
    check_splittable([source, *(targets if args.upper_bound else [])], args.split_seed)
    budget = resolve_budget(args, environment)
    environment.update({BUDGET_VARIABLES[attribute]: str(value) for attribute, value in budget.items()})
    baseline = BUDGET_BASELINE if budget else BASELINE
    trainers = list(dict.fromkeys((args.trainers or [baseline, DESAM_B, DESAM_P]) + (list(ABLATIONS) if args.ablations else [])))
    trained = trainers + ([baseline] if args.upper_bound else [])
    classes = {trainer: find_trainer_class(trainer, environment) for trainer in trained}
    if args.grid_sizes and DESAM_P not in trainers:
        raise ExperimentError(f"--grid-sizes needs DeSAM-P ({DESAM_P}) among the trainers")
    if any(issubclass(cls, nnUNetTrainerDeSAM) for cls in classes.values()):
        check_sam_checkpoint(environment)
    experiment = Experiment(
        source=source, targets=targets, trainers=trainers, baseline=baseline, upper_bound=args.upper_bound,
        protocol=args.protocol, grid_sizes=sorted(set(args.grid_sizes or [])),
        main_grid_size=main_grid_size(environment), budget=budget,
        output=(args.output or Path(f"crossdomain_{source.name}")).resolve(),
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), split_seed=args.split_seed,
        seed=args.seed, n_boot=args.n_boot, environment=environment, notes=tuple(notes),
        method_names=display_names(trainers, lambda trainer: METHOD_NAMES.get(trainer, trainer)),
        domain_names=display_names([source.name, *(target.name for target in targets)],
                                   lambda name: name.split("_", 1)[1]),
    )
    check_finished_budgets(experiment, classes)
    return experiment


def resolve_dataset(name_or_id: str, raw: Path) -> Dataset:
    """The raw dataset ``DatasetXXX_Name`` (given as id or name) with its labels and cases."""
    if name_or_id.isdigit():
        matches = sorted(p for p in raw.glob(f"Dataset{int(name_or_id):03d}_*") if p.is_dir())
    elif name_or_id.startswith("Dataset") and "/" not in name_or_id:
        matches = [raw / name_or_id] if (raw / name_or_id).is_dir() else []
    else:
        raise ExperimentError(f"dataset {name_or_id!r}: give an id (e.g. 901) or a name (e.g. Dataset901_SiteA)")
    if not matches:
        raise ExperimentError(f"unknown dataset {name_or_id!r}: no such dataset folder in nnUNet_raw ({raw})")
    if len(matches) > 1:
        raise ExperimentError(f"dataset id {name_or_id} is ambiguous in nnUNet_raw: {', '.join(p.name for p in matches)}")
    folder = matches[0]
    try:
        dataset_json = json.loads((folder / "dataset.json").read_text())
        labels, file_ending = dataset_json["labels"], dataset_json["file_ending"]
        num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality")))
    except (OSError, ValueError, KeyError, TypeError):
        raise ExperimentError(f"{folder / 'dataset.json'} is missing or lacks labels, file_ending or channel_names") from None
    if not all(isinstance(value, int) for value in labels.values()) or "ignore" in labels:
        raise ExperimentError(f"{folder.name}: only plain integer labels are supported (no regions, no ignore label)")
    if not (folder / "imagesTr").is_dir():
        raise ExperimentError(f"{folder.name} has no imagesTr folder")
    cases = sorted(get_identifiers_from_splitted_dataset_folder(str(folder / "imagesTr"), file_ending))
    unlabelled = [case for case in cases if not (folder / "labelsTr" / f"{case}{file_ending}").is_file()]
    if not cases or unlabelled:
        raise ExperimentError(f"{folder.name}: " + (f"cases without a label in labelsTr: {', '.join(unlabelled[:5])}"
                                                     if unlabelled else "no cases in imagesTr"))
    return Dataset(folder.name, folder, labels, file_ending, num_channels, tuple(cases))


def check_targets(source: Dataset, targets: Sequence[Dataset]) -> None:
    """A source model can only be scored on targets with its labels, file ending and number of channels."""
    names = [target.name for target in targets]
    if source.name in names:
        raise ExperimentError(f"{source.name} is the source; a target must be another domain")
    if len(set(names)) < len(names):
        raise ExperimentError(f"a target is listed twice: {', '.join(names)}")
    for target in targets:
        if target.labels != source.labels:
            raise ExperimentError(f"labels of target {target.name} {target.labels} differ from those of source "
                                  f"{source.name} {source.labels}; targets need the same label names and values")
        if target.file_ending != source.file_ending:
            raise ExperimentError(f"target {target.name} uses {target.file_ending} files, source {source.name} "
                                  f"{source.file_ending}; convert them to one file ending")
        if target.num_channels != source.num_channels:
            raise ExperimentError(f"target {target.name} has {target.num_channels} channel(s), source {source.name} "
                                  f"{source.num_channels}")


def check_splittable(datasets: Sequence[Dataset], seed: int) -> None:
    """Every dataset that is trained on needs its 9:1 split (at least two cases)."""
    for dataset in datasets:
        try:
            compute_source_split(dataset.cases, seed)
        except SplitError as error:
            raise ExperimentError(f"{dataset.name}: {error}") from None


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


def find_trainer_class(trainer: str, environment: Mapping[str, str]) -> type:
    """The trainer class, looked up as nnU-Net's commands will: this package, nnunetv2, then nnUNet_extTrainer."""
    cls = package_trainer_classes().get(trainer)
    if cls is not None:
        return cls
    with _extra_trainer_folders(environment["nnUNet_extTrainer"]):
        try:
            return recursive_find_trainer_class_by_name(trainer)
        except RuntimeError:
            raise ExperimentError(f"unknown trainer {trainer!r}: not in nnunetv2_desam, nnunetv2 or the folders "
                                  f"of nnUNet_extTrainer") from None


@lru_cache(maxsize=None)
def package_trainer_classes() -> dict[str, type]:
    """``{name: class}`` of every nnU-Net trainer in ``nnunetv2_desam.trainers``, imported under the package's name
    (nnU-Net's own search imports them as top-level modules, whose classes are other objects)."""
    classes = {}
    for module_info in pkgutil.iter_modules(trainers_package.__path__):
        module = importlib.import_module(f"{trainers_package.__name__}.{module_info.name}")
        classes.update({name: value for name, value in vars(module).items()
                        if isinstance(value, type) and issubclass(value, nnUNetTrainer) and value is not nnUNetTrainer})
    return classes


@contextmanager
def _extra_trainer_folders(folders: str):
    """nnU-Net reads nnUNet_extTrainer from os.environ when it searches; lend it ours for the search only."""
    previous = os.environ.get("nnUNet_extTrainer")
    os.environ["nnUNet_extTrainer"] = folders
    try:
        yield
    finally:
        if previous is None:
            del os.environ["nnUNet_extTrainer"]
        else:
            os.environ["nnUNet_extTrainer"] = previous


def check_sam_checkpoint(environment: Mapping[str, str]) -> None:
    path = environment.get(SAM_CHECKPOINT_VARIABLE)
    if not path:
        raise ExperimentError(f"{SAM_CHECKPOINT_VARIABLE} is not set: DeSAM trainers need an official SAM checkpoint, "
                              f"e.g. export {SAM_CHECKPOINT_VARIABLE}=/path/to/sam_vit_b_01ec64.pth")
    if not Path(path).is_file():
        raise ExperimentError(f"{SAM_CHECKPOINT_VARIABLE}={path} does not exist")


def main_grid_size(environment: Mapping[str, str]) -> int:
    """The grid DeSAM-P predicts with: DESAM_GRID_SIZE, else the paper's 9×9."""
    return positive_int_from_environment(GRID_SIZE_VARIABLE, environment) or DeSAMSettings.grid_size


def uses_point_grid(trainer: str) -> bool:
    """Whether DESAM_GRID_SIZE changes this trainer's predictions (point prompts through PRIM)."""
    settings = getattr(package_trainer_classes().get(trainer), "desam_settings", None)
    return settings is not None and settings.prompt_mode == "points" and settings.use_prim


def honours_budget(cls: type) -> bool:
    return issubclass(cls, (nnUNetTrainerBudget, nnUNetTrainerDeSAM))


def training_record(folder: Path) -> dict:
    """Budget and batch size nnU-Net recorded in ``debug.json`` when the training started; {} if absent."""
    try:
        debug = json.loads((folder / "debug.json").read_text())
    except (OSError, ValueError):
        return {}
    keys = [*BUDGET_VARIABLES, "batch_size"]
    return {key: int(debug[key]) for key in keys if str(debug.get(key, "")).isdigit()}


def check_finished_budgets(experiment: Experiment, classes: Mapping[str, type]) -> None:
    """A finished training is reused only if it had the budget asked for; refuse a mismatch up front."""
    models = [(experiment.source, trainer) for trainer in experiment.trainers]
    if experiment.upper_bound:
        models += [(target, experiment.baseline) for target in experiment.targets]
    for dataset, trainer in models:
        folder = experiment.model_folder(dataset, trainer)
        if not (folder / "checkpoint_final.pth").is_file() or not honours_budget(classes[trainer]):
            continue
        record = training_record(folder)
        for attribute, value in experiment.budget.items():
            if attribute in record and record[attribute] != value:
                raise ExperimentError(f"{folder} finished with {attribute}={record[attribute]}, but {value} was asked "
                                      f"for; remove that folder to retrain, or use another nnUNet_results")


# ----------------------------------------------------------------------------------------------
# steps


def plan_steps(experiment: Experiment) -> list[Step]:
    """Every step of the experiment, in order; trainings first, then predictions and scores, then the report."""
    steps = preparation_steps(experiment, experiment.source)
    steps += [training_step(experiment, experiment.source, trainer) for trainer in experiment.trainers]
    if experiment.upper_bound:
        for target in experiment.targets:
            steps += preparation_steps(experiment, target)
            steps.append(training_step(experiment, target, experiment.baseline))
    for prediction in table_predictions(experiment) + extra_grid_predictions(experiment):
        steps += [prediction_step(experiment, prediction), scoring_step(experiment, prediction)]
    steps.append(Step("write the report (table.md, table.csv, per_case.json, dice_bar_chart.png)",
                      lambda: write_report(experiment)))
    steps.append(Step("draw the figures (overlays.png" + (", dice_vs_grid_size.png)" if experiment.grid_sizes else ")"),
                      lambda: write_figures(experiment)))
    return steps


def cross_domain_predictions(experiment: Experiment) -> list[Prediction]:
    """Every trainer (trained on the source) on every target: the main rows of the table."""
    return [Prediction(f"{trainer}/{target.name}", experiment.method_names[trainer], trainer, experiment.source, target,
                       experiment.main_grid_size if uses_point_grid(trainer) else None)
            for trainer in experiment.trainers for target in experiment.targets]


def in_domain_predictions(experiment: Experiment) -> list[Prediction]:
    """Every trainer on the source's held-out validation cases: the in-domain column."""
    source = experiment.source
    return [Prediction(f"{trainer}/{source.name}", experiment.method_names[trainer], trainer, source, source,
                       experiment.main_grid_size if uses_point_grid(trainer) else None, in_domain=True)
            for trainer in experiment.trainers]


def table_predictions(experiment: Experiment) -> list[Prediction]:
    """The rows of the table: the upper bound (if asked for) first, as in the paper, then the trainers."""
    upper = [Prediction(f"{UPPER_BOUND_KEY}/{target.name}", UPPER_BOUND_NAME,
                        experiment.baseline, target, target, None, in_domain=True)
             for target in experiment.targets] if experiment.upper_bound else []
    return upper + in_domain_predictions(experiment) + cross_domain_predictions(experiment)


def grid_predictions(experiment: Experiment, grid_size: int) -> list[Prediction]:
    """DeSAM-P on every target at one grid size; the main predictions where the grid is the same."""
    if grid_size == experiment.main_grid_size:
        return [p for p in cross_domain_predictions(experiment) if p.trainer == DESAM_P]
    return [Prediction(f"grid_size_{grid_size}/{target.name}", f"{grid_size}×{grid_size} grid", DESAM_P,
                       experiment.source, target, grid_size) for target in experiment.targets]


def extra_grid_predictions(experiment: Experiment) -> list[Prediction]:
    return [p for k in experiment.grid_sizes if k != experiment.main_grid_size for p in grid_predictions(experiment, k)]


def preparation_steps(experiment: Experiment, dataset: Dataset) -> list[Step]:
    """``nnUNetv2_plan_and_preprocess -c 2d`` and the 9:1 split of a dataset that is trained on."""
    n = experiment.processes
    command = ["nnUNetv2_plan_and_preprocess", "-d", str(dataset.dataset_id), "-c", CONFIGURATION,
               "-np", n, "-npfp", n]
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0, a value
    # training accepts (augmentation in the main process).
    planner_environment = {"nnUNet_n_proc_DA": "1"} if experiment.environment.get("nnUNet_n_proc_DA") == "0" else {}
    split_file = experiment.preprocessed / dataset.name / SPLITS_FILE
    return [
        Step(f"preprocess {dataset.name} ({CONFIGURATION})",
             lambda: run_logged(experiment, f"preprocess {dataset.name} ({CONFIGURATION})",
                                f"preprocess_{dataset.name}", command, planner_environment),
             lambda: is_preprocessed(experiment.preprocessed / dataset.name, dataset)),
        Step(f"write the 9:1 split of {dataset.name} (seed {experiment.split_seed})",
             lambda: write_split(experiment, dataset),
             lambda: split_file.is_file() and json.loads(split_file.read_text()) == [
                 compute_source_split(dataset.cases, experiment.split_seed)]),
    ]


def is_preprocessed(folder: Path, dataset: Dataset) -> bool:
    """nnU-Net's 2d plans exist and the preprocessed data holds every case (its .pkl is written last)."""
    try:
        plans = json.loads((folder / f"{PLANS}.json").read_text())
        data = folder / plans["configurations"][CONFIGURATION]["data_identifier"]
    except (OSError, ValueError, KeyError):
        return False
    return all((data / f"{case}.pkl").is_file() for case in dataset.cases)


def write_split(experiment: Experiment, dataset: Dataset) -> None:
    try:
        write_source_split(experiment.preprocessed / dataset.name, seed=experiment.split_seed,
                           log=lambda line: print(f"  {line}"))
    except SplitError as error:
        raise ExperimentError(str(error)) from None


def training_step(experiment: Experiment, dataset: Dataset, trainer: str) -> Step:
    """``nnUNetv2_train DATASET 2d 0 -tr TRAINER``; done once checkpoint_final.pth exists, ``--c`` resumes."""
    folder = experiment.model_folder(dataset, trainer)
    title = f"train {trainer} on {dataset.name}"

    def run() -> None:
        resume = any((folder / name).is_file() for name in ("checkpoint_latest.pth", "checkpoint_best.pth"))
        command = ["nnUNetv2_train", dataset.name, CONFIGURATION, str(FOLD), "-tr", trainer, "-device", experiment.device]
        if resume:
            print("  resuming the interrupted training (--c)")
        run_logged(experiment, title, f"train_{trainer}_{dataset.name}", command + (["--c"] if resume else []))

    return Step(title, run, lambda: (folder / "checkpoint_final.pth").is_file())


def prediction_stamp(experiment: Experiment, prediction: Prediction) -> dict:
    """What a prediction folder was made from; a different stamp means its predictions are stale."""
    checkpoint = experiment.model_folder(prediction.model_dataset, prediction.trainer) / CHECKPOINT
    return {"checkpoint": str(checkpoint), "checkpoint_mtime_ns": checkpoint.stat().st_mtime_ns,
            "input": str(experiment.input_folder(prediction)), "cases": experiment.cases(prediction),
            "grid_size": prediction.grid_size}


def prediction_is_done(experiment: Experiment, prediction: Prediction) -> bool:
    folder = experiment.prediction_folder(prediction)
    try:
        stamp = json.loads((folder / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (stamp == prediction_stamp(experiment, prediction)
            and all((folder / f"{case}{prediction.target.file_ending}").is_file() for case in stamp["cases"]))


def prediction_step(experiment: Experiment, prediction: Prediction) -> Step:
    """``nnUNetv2_predict`` with checkpoint_best.pth; clears the folder and the scores of an earlier prediction."""
    model = prediction.model_dataset
    title = f"predict {describe_images(prediction)} with {prediction.trainer} trained on {model.name}{describe_grid(prediction)}"

    def run() -> None:
        folder = experiment.prediction_folder(prediction)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(experiment.score_file(prediction).parent, ignore_errors=True)
        if prediction.in_domain:
            copy_cases(prediction.target, experiment.cases(prediction), experiment.input_folder(prediction))
        processes = str(min(3, int(experiment.processes)))
        command = ["nnUNetv2_predict", "-i", str(experiment.input_folder(prediction)), "-o", str(folder),
                   "-d", model.name, "-c", CONFIGURATION, "-tr", prediction.trainer, "-f", str(FOLD),
                   "-chk", CHECKPOINT, "-device", experiment.device, "-npp", processes, "-nps", processes]
        extra = {GRID_SIZE_VARIABLE: str(prediction.grid_size)} if prediction.grid_size else {}
        run_logged(experiment, title, "predict_" + prediction.key.replace("/", "_"), command, extra)
        (folder / STAMP_FILE).write_text(json.dumps(prediction_stamp(experiment, prediction), indent=2))

    return Step(title, run, lambda: prediction_is_done(experiment, prediction))


def describe_images(prediction: Prediction) -> str:
    return (f"the validation cases of {prediction.target.name}" if prediction.in_domain
            else prediction.target.name)


def describe_grid(prediction: Prediction) -> str:
    return f" with a {prediction.grid_size}×{prediction.grid_size} grid" if prediction.grid_size else ""


def copy_cases(dataset: Dataset, cases: Sequence[str], folder: Path) -> None:
    """Copy the images of ``cases`` into a fresh ``folder`` (nnUNetv2_predict reads whole folders)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for case in cases:
        for image in sorted(dataset.folder.glob(f"imagesTr/{case}_[0-9][0-9][0-9][0-9]{dataset.file_ending}")):
            shutil.copy2(image, folder / image.name)


def scoring_step(experiment: Experiment, prediction: Prediction) -> Step:
    """Dice of one prediction folder against the target's labelsTr, under the chosen protocol."""
    score_file = experiment.score_file(prediction)
    title = (f"score {describe_images(prediction)} predicted by {prediction.trainer}{describe_grid(prediction)} "
             f"({experiment.protocol})")

    def run() -> None:
        score_file.parent.mkdir(parents=True, exist_ok=True)
        target, predictions = prediction.target, experiment.prediction_folder(prediction)
        if experiment.protocol == "foreground-slices":
            scores = score_folder_foreground_slices(str(target.folder / "labelsTr"), str(predictions),
                                                    target.labels, target.file_ending)
            document = {case: {name: None if math.isnan(v) else v for name, v in per_class.items()}
                        for case, per_class in scores.items()}
            score_file.write_text(json.dumps(document, indent=2))
            return
        model = experiment.model_folder(prediction.model_dataset, prediction.trainer).parent
        command = ["nnUNetv2_evaluate_folder", str(target.folder / "labelsTr"), str(predictions),
                   "-djfile", str(model / "dataset.json"), "-pfile", str(model / "plans.json"),
                   "-o", str(score_file), "-np", experiment.processes]
        run_logged(experiment, title, "score_" + prediction.key.replace("/", "_"),
                   command + (["--chill"] if prediction.in_domain else []))

    return Step(title, run, score_file.is_file)


def read_scores(experiment: Experiment, prediction: Prediction) -> dict:
    """``{case: {class: dice}}`` of a scored prediction folder (NaN where the class is absent from both)."""
    score_file, target = experiment.score_file(prediction), prediction.target
    if experiment.protocol == "whole-volume":
        return dice_per_case_from_summary(str(score_file), target.labels, target.file_ending)
    return {case: {name: math.nan if v is None else v for name, v in per_class.items()}
            for case, per_class in json.loads(score_file.read_text()).items()}


def run_logged(experiment: Experiment, title: str, log_name: str, command: list[str],
               extra_environment: Mapping[str, str] | None = None) -> None:
    """Run a console command, streaming its output to the terminal and to ``logs/<log_name>.log``;
    StepFailed naming the step ``title`` if it fails."""
    logs = experiment.output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / f"{log_name}.log"
    extra_environment = dict(extra_environment or {})
    environment = {**experiment.environment, **extra_environment}
    shown = " ".join([*(f"{name}={value}" for name, value in extra_environment.items()), shlex.join(command)])
    print(f"  $ {shown}\n  (log: {log_file})", flush=True)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(log_file, "wb") as log:
        log.write(f"$ {shown}\n".encode())
        with subprocess.Popen([console_script(command[0]), *command[1:]], env=environment,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
            try:
                for chunk in iter(lambda: process.stdout.read1(65536), b""):
                    log.write(chunk)
                    sys.stdout.write(decoder.decode(chunk))
                    sys.stdout.flush()
            except KeyboardInterrupt:  # a terminal's Ctrl-C reaches the child too; a plain SIGINT does not
                process.terminate()
                process.wait()
                raise
    if process.returncode != 0:
        raise StepFailed(f"step '{title}' failed with exit status {process.returncode}; command: {shown}; "
                         f"full output in {log_file}")


def console_script(name: str) -> str:
    """The console script beside this Python (an unactivated venv), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise ExperimentError(f"{name} not found next to {sys.executable} or on PATH: is nnunetv2 installed?")
    return found


def run_steps(steps: Sequence[Step]) -> None:
    for number, step in enumerate(steps, 1):
        header = f"[{number}/{len(steps)}] {step.title}"
        if step.done():
            print(f"{header}: skipped (done)", flush=True)
            continue
        print(f"\n{header}", flush=True)
        start = time.monotonic()
        step.run()
        print(f"{header}: finished in {time.monotonic() - start:.0f} s", flush=True)


# ----------------------------------------------------------------------------------------------
# report and figures


def collect_results(experiment: Experiment, predictions: Sequence[Prediction],
                    label: Callable[[Prediction], str] = lambda prediction: prediction.method) -> report.Results:
    """The scores of ``predictions`` as one Results, rows named by ``label``, columns by target."""
    results = report.Results(PROTOCOLS[experiment.protocol], n_boot=experiment.n_boot, seed=experiment.seed)
    for prediction in predictions:
        on_source = prediction.target == experiment.source
        column = experiment.domain_names[prediction.target.name] + (" (in-domain)" if on_source else "")
        results.add(label(prediction), column, read_scores(experiment, prediction), in_domain=on_source)
    return results


def report_notes(experiment: Experiment) -> list[str]:
    """What a reader of the table needs to know: names, split, model choice, budgets, inference settings."""
    split = compute_source_split(experiment.source.cases, experiment.split_seed)
    notes = list(experiment.notes) + [
        f"Source: {experiment.source.name}, split 9:1 (seed {experiment.split_seed}): {len(split['train'])} training, "
        f"{len(split['val'])} in-domain validation cases.",
        f"In-domain column: every method on those {len(split['val'])} validation case(s) of the source, same "
        f"checkpoint; {report.OVERALL} averages the target domains only.",
        "Targets, every case scored: " + "; ".join(
            f"{experiment.domain_names[t.name]} = {t.name} ({len(t.cases)} cases)" for t in experiment.targets) + ".",
        "Methods (nnU-Net trainer, training budget from its debug.json): " + "; ".join(
            f"{experiment.method_names[trainer]} = {trainer} "
            f"({describe_training(training_record(experiment.model_folder(experiment.source, trainer)))})"
            for trainer in experiment.trainers) + ".",
        f"Model: fold {FOLD}, {CHECKPOINT}, which nnU-Net keeps as the best EMA pseudo-Dice on the in-domain "
        f"validation split (the paper's 'best model on the in-domain validation set').",
    ]
    if experiment.baseline == BUDGET_BASELINE:
        notes.append(f"Baseline: {BUDGET_BASELINE} is the stock nnUNetTrainer with the same epochs and iterations as "
                     f"the DeSAM trainers (at its own batch size from nnU-Net's plans), not nnU-Net's 1000 epochs.")
    if experiment.upper_bound:
        notes.append(f"{UPPER_BOUND_NAME}: {experiment.baseline} trained on each target's own 9:1 split, scored on "
                     f"that target's held-out validation cases only (n_cases in table.csv), not on every case; "
                     + "; ".join(f"{experiment.domain_names[t.name]}: "
                                 f"{describe_training(training_record(experiment.model_folder(t, experiment.baseline)))}"
                                 for t in experiment.targets) + ".")
    if experiment.protocol == "foreground-slices":
        notes.append("Protocol: Dice over the slices (first image axis) where the reference has foreground, as the "
                     "authors score; their 50-pixel border zeroing and mask-generator filtering are not applied.")
    if any(uses_point_grid(trainer) for trainer in experiment.trainers):
        notes.append(f"Inference: point-prompt DeSAM trainers with a {experiment.main_grid_size}×"
                     f"{experiment.main_grid_size} grid ({GRID_SIZE_VARIABLE}).")
    notes.append("nnU-Net trainers predict with their default test-time mirroring; DeSAM trainers without it "
                 "(their setting).")
    return notes


def describe_training(record: dict) -> str:
    if not record:
        return "no debug.json"
    return (f"{record.get('num_epochs', '?')} epochs × {record.get('num_iterations_per_epoch', '?')} iterations, "
            f"batch {record.get('batch_size', '?')}")


def write_report(experiment: Experiment) -> None:
    """table.md (with the notes under its title), table.csv, per_case.json, dice_bar_chart.png; print the table."""
    results = collect_results(experiment, table_predictions(experiment))
    output = experiment.output
    report.write_markdown_table(results, str(output / "table.md"))
    notes = report_notes(experiment)
    title, rest = (output / "table.md").read_text().split("\n", 1)
    (output / "table.md").write_text("\n".join([title, "", *(f"- {note}" for note in notes), rest]))
    report.write_csv(results, str(output / "table.csv"))
    report.write_per_case_json(results, str(output / "per_case.json"))
    report.plot_bar_chart(results, str(output / "dice_bar_chart.png"))
    print("\n" + "\n".join(notes) + "\n\n" + report.format_table(results), flush=True)


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
                                  label=f"{experiment.method_names[DESAM_P]}, mean over targets", protocol=results.protocol)
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
    report.plot_overlays(str(experiment.output / "overlays.png"), rows)


def most_foreground_case(dataset: Dataset) -> str:
    """The case whose reference has the most foreground voxels: the most telling one to show."""
    def foreground(case: str) -> int:
        return np.count_nonzero(sitk.GetArrayViewFromImage(sitk.ReadImage(str(dataset.ground_truth(case)))))
    return max(dataset.cases, key=foreground)


# ----------------------------------------------------------------------------------------------
# entry points


def describe(experiment: Experiment) -> str:
    budget = (", ".join(f"{BUDGET_VARIABLES[attribute]}={value}" for attribute, value in experiment.budget.items())
              or "none (each trainer's own schedule)")
    lines = [
        f"source:    {experiment.source.name} ({len(experiment.source.cases)} cases)",
        f"targets:   {', '.join(f'{t.name} ({len(t.cases)} cases)' for t in experiment.targets)}",
        f"trainers:  {', '.join(f'{experiment.method_names[t]} = {t}' for t in experiment.trainers)}",
        f"baseline:  {experiment.baseline}" + (" (a budget is given, so the stock trainer that honours it)"
                                               if experiment.baseline == BUDGET_BASELINE else ""),
        f"budget:    {budget}",
        f"protocol:  {PROTOCOLS[experiment.protocol]}",
        f"model:     {CHECKPOINT} (best EMA pseudo-Dice on the in-domain validation split)",
        f"device:    {experiment.device}; nnUNet_def_n_proc={experiment.processes}",
        f"output:    {experiment.output}",
    ]
    if experiment.upper_bound:
        lines.append(f"upper bound: {experiment.baseline} trained on each target, scored on its validation cases")
    if experiment.grid_sizes:
        lines.append(f"grid sizes: {', '.join(map(str, experiment.grid_sizes))} (main grid {experiment.main_grid_size})")
    if BASELINE in experiment.trainers and experiment.budget:
        lines.append(f"warning:   {BASELINE} ignores the budget and trains 1000 epochs; {BUDGET_BASELINE} honours it")
    if SAM_CHECKPOINT_VARIABLE in experiment.environment:
        lines.append(f"SAM:       {experiment.environment[SAM_CHECKPOINT_VARIABLE]}")
    return "\n".join(lines)


def run_experiment(argv: Sequence[str] | None, environment: Mapping[str, str], notes: Sequence[str] = ()) -> Experiment:
    """Parse ``argv``, check it, run every step not done yet. Raises ExperimentError or StepFailed."""
    args = build_parser().parse_args(argv)
    experiment = build_experiment(args, environment, notes)
    experiment.output.mkdir(parents=True, exist_ok=True)
    print(f"{PROG}\n{describe(experiment)}", flush=True)
    start = time.monotonic()
    run_steps(plan_steps(experiment))
    print(f"\nDone in {time.monotonic() - start:.0f} s. Outputs in {experiment.output}: table.md, table.csv, "
          f"per_case.json, dice_bar_chart.png, overlays.png" + (", dice_vs_grid_size.png" if experiment.grid_sizes else ""))
    return experiment


RESUME_HINT = "run the same command again to resume"


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run_console_command(PROG, lambda: run_experiment(argv, dict(os.environ)), RESUME_HINT))


if __name__ == "__main__":
    main()
