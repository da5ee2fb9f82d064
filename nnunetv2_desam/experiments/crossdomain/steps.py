"""The step graph: preprocess and split, train, predict, score, report; each step knows whether it is done.

Each step runs the real nnU-Net console command (:mod:`.subprocess_runner`). Resumable: a step whose
outputs exist prints "skipped (done)". A prediction folder carries a stamp naming the checkpoint (and its
modification time) and the grid size it was made with, so retraining or another grid size redoes the
prediction; predicting again deletes its scores. The stamp is written before nnUNetv2_predict starts, so an
interrupted prediction with the same stamp continues where it stopped (``--continue_prediction``).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

from nnunetv2_desam.environment_variables import GRID_SIZE_VARIABLE
from nnunetv2_desam.errors import ExperimentError
from nnunetv2_desam.experiments.crossdomain.datasets import Dataset
from nnunetv2_desam.experiments.crossdomain.experiment import (CHECKPOINT, CONFIGURATION, DEFAULT_PLANS, FOLD, Experiment,
                                                               Prediction, other_split_message)
from nnunetv2_desam.experiments.crossdomain.figures import write_figures
from nnunetv2_desam.experiments.crossdomain.predictions import extra_grid_predictions, table_predictions
from nnunetv2_desam.experiments.crossdomain.report_notes import write_report
from nnunetv2_desam.experiments.crossdomain.subprocess_runner import run_logged
from nnunetv2_desam.experiments.scoring import score_folder_foreground_slices
from nnunetv2_desam.experiments.splits import SplitError, holds_source_split, write_source_split

STAMP_FILE = "desam_prediction.json"


@dataclass(frozen=True)
class Step:
    """One unit of work: ``done`` says whether its outputs already exist, ``run`` makes them."""

    title: str
    run: Callable[[], None]
    done: Callable[[], bool] = lambda: False


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


def run_command(experiment: Experiment, title: str, log_name: str, command: list[str],
                extra_environment: Mapping[str, str] | None = None) -> None:
    """:func:`run_logged` with the experiment's environment, logging to ``OUTPUT/logs/<log_name>.log``."""
    log_file = experiment.output / "logs" / f"{log_name}.log"
    run_logged(title, command, log_file, experiment.environment, extra_environment)


def preparation_steps(experiment: Experiment, dataset: Dataset) -> list[Step]:
    """``nnUNetv2_plan_and_preprocess -c 2d`` (``nnUNetv2_preprocess -plans_name`` for the user's own plans) and
    the 9:1 split of a dataset that is trained on."""
    n = experiment.processes
    if experiment.plans == DEFAULT_PLANS:
        command = ["nnUNetv2_plan_and_preprocess", "-d", str(dataset.dataset_id), "-c", CONFIGURATION,
                   "-np", n, "-npfp", n]
    else:
        command = ["nnUNetv2_preprocess", "-d", str(dataset.dataset_id), "-plans_name", experiment.plans,
                   "-c", CONFIGURATION, "-np", n]
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0, a value
    # training accepts (augmentation in the main process).
    planner_environment = {"nnUNet_n_proc_DA": "1"} if experiment.environment.get("nnUNet_n_proc_DA") == "0" else {}
    title = f"preprocess {dataset.name} ({CONFIGURATION})"
    return [
        Step(title, lambda: run_command(experiment, title, f"preprocess_{dataset.name}", command, planner_environment),
             lambda: is_preprocessed(experiment.preprocessed / dataset.name / f"{experiment.plans}.json", dataset)),
        Step(f"write the 9:1 split of {dataset.name} (seed {experiment.split_seed})",
             lambda: write_split(experiment, dataset),
             lambda: holds_source_split(experiment.split_file(dataset), dataset.cases, experiment.split_seed)),
    ]


def is_preprocessed(plans_file: Path, dataset: Dataset) -> bool:
    """The 2d plans exist and the preprocessed data holds every case (its .pkl is written last)."""
    try:
        plans = json.loads(plans_file.read_text())
        data = plans_file.parent / plans["configurations"][CONFIGURATION]["data_identifier"]
    except (OSError, ValueError, KeyError):
        return False
    return all((data / f"{case}.pkl").is_file() for case in dataset.cases)


def write_split(experiment: Experiment, dataset: Dataset) -> None:
    try:
        write_source_split(experiment.preprocessed / dataset.name, seed=experiment.split_seed,
                           overwrite=experiment.overwrite_split, log=lambda line: print(f"  {line}"))
    except SplitError as error:
        split_exists = experiment.split_file(dataset).is_file() and not experiment.overwrite_split
        raise ExperimentError(other_split_message(experiment, dataset) if split_exists else str(error)) from None


def training_step(experiment: Experiment, dataset: Dataset, trainer: str) -> Step:
    """``nnUNetv2_train DATASET 2d 0 -tr TRAINER``; done once checkpoint_final.pth exists, ``--c`` resumes."""
    folder = experiment.model_folder(dataset, trainer)
    title = f"train {trainer} on {dataset.name}"

    def run() -> None:
        resume = any((folder / name).is_file() for name in ("checkpoint_latest.pth", "checkpoint_best.pth"))
        command = ["nnUNetv2_train", dataset.name, CONFIGURATION, str(FOLD), "-tr", trainer, "-p", experiment.plans,
                   "-device", experiment.device]
        if resume:
            print("  resuming the interrupted training (--c)")
        run_command(experiment, title, f"train_{trainer}_{dataset.name}", command + (["--c"] if resume else []))

    return Step(title, run, lambda: (folder / "checkpoint_final.pth").is_file())


def prediction_stamp(experiment: Experiment, prediction: Prediction) -> dict:
    """What a prediction folder was made from; a different stamp means its predictions are stale."""
    checkpoint = experiment.model_folder(prediction.model_dataset, prediction.trainer) / CHECKPOINT
    return {"checkpoint": str(checkpoint), "checkpoint_mtime_ns": checkpoint.stat().st_mtime_ns,
            "input": str(experiment.input_folder(prediction)), "cases": experiment.cases(prediction),
            "grid_size": prediction.grid_size,
            "grid_aggregation": experiment.grid_aggregation if prediction.grid_size else None}


def read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


def prediction_is_done(experiment: Experiment, prediction: Prediction) -> bool:
    folder = experiment.prediction_folder(prediction)
    stamp = read_stamp(folder)
    return (stamp == prediction_stamp(experiment, prediction)
            and all((folder / f"{case}{prediction.target.file_ending}").is_file() for case in stamp["cases"]))


def prediction_step(experiment: Experiment, prediction: Prediction) -> Step:
    """``nnUNetv2_predict`` with checkpoint_best.pth; deletes the prediction's scores. A folder stamped for the same
    checkpoint, images and grid is continued (its finished cases kept), any other is cleared first."""
    model = prediction.model_dataset
    title = f"predict {describe_images(prediction)} with {prediction.trainer} trained on {model.name}{describe_grid(prediction)}"

    def run() -> None:
        folder = experiment.prediction_folder(prediction)
        stamp = prediction_stamp(experiment, prediction)
        resume = read_stamp(folder) == stamp
        shutil.rmtree(experiment.score_file(prediction).parent, ignore_errors=True)
        if resume:
            kept = keep_finished_cases(folder, prediction.target, stamp["cases"])
            print(f"  continuing the interrupted prediction: {kept} of {len(stamp['cases'])} cases kept "
                  "(--continue_prediction)")
        else:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            (folder / STAMP_FILE).write_text(json.dumps(stamp, indent=2))
        if prediction.in_domain:
            copy_cases(prediction.target, experiment.cases(prediction), experiment.input_folder(prediction))
        processes = str(min(3, int(experiment.processes)))
        command = ["nnUNetv2_predict", "-i", str(experiment.input_folder(prediction)), "-o", str(folder),
                   "-d", model.name, "-c", CONFIGURATION, "-tr", prediction.trainer, "-p", experiment.plans, "-f", str(FOLD),
                   "-chk", CHECKPOINT, "-device", experiment.device, "-npp", processes, "-nps", processes]
        extra = {GRID_SIZE_VARIABLE: str(prediction.grid_size)} if prediction.grid_size else {}
        run_command(experiment, title, "predict_" + prediction.key.replace("/", "_"), command + (
            ["--continue_prediction"] if resume else []), extra)

    return Step(title, run, lambda: prediction_is_done(experiment, prediction))


def keep_finished_cases(folder: Path, dataset: Dataset, cases: Sequence[str]) -> int:
    """Delete the predicted segmentations in ``folder`` that nnU-Net's reader cannot read (a write cut off by the
    interruption; ``--continue_prediction`` would skip them); returns how many cases remain."""
    reader = determine_reader_writer_from_file_ending(dataset.file_ending, str(dataset.ground_truth(cases[0])),
                                                      verbose=False)()
    kept = 0
    for case in cases:
        path = folder / f"{case}{dataset.file_ending}"
        if not path.is_file():
            continue
        try:
            reader.read_seg(str(path))
        except Exception:  # any reader's failure: not a finished prediction
            path.unlink()
            continue
        kept += 1
    return kept


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
        run_command(experiment, title, "score_" + prediction.key.replace("/", "_"),
                    command + (["--chill"] if prediction.in_domain else []))

    return Step(title, run, score_file.is_file)
