"""``nnUNetv2_desam_crossdomain``: the command line, the summary it prints first, and the run."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from nnunetv2_desam.console import run_console_command
from nnunetv2_desam.environment_variables import BUDGET_VARIABLES, SAM_CHECKPOINT_VARIABLE, positive_int_argument
from nnunetv2_desam.experiments.crossdomain.experiment import (CHECKPOINT, DEFAULT_PLANS, PROTOCOLS, Experiment,
                                                               build_experiment)
from nnunetv2_desam.experiments.crossdomain.methods import (ABLATION_ROWS, BASELINE, BUDGET_BASELINE, DEFAULT_ROWS,
                                                            METHODS, TABLE_ROWS, honours_budget)
from nnunetv2_desam.experiments.crossdomain.steps import plan_steps, run_steps
from nnunetv2_desam.experiments.splits import DEFAULT_SEED

PROG = "nnUNetv2_desam_crossdomain"
RESUME_HINT = "run the same command again to resume"


def _methods_help() -> str:
    tables = "; ".join(f"{table}: {' '.join(rows)}" for table, rows in TABLE_ROWS.items())
    return (f"rows by name, in the order given: {', '.join(METHODS)}, or a whole paper table ({tables}); rows of a table "
            f"whose trainer is not installed are left out with a note, a row named on its own must be installed "
            f"(default without -tr: {' '.join(DEFAULT_ROWS)}). The baseline is {BASELINE}, or {BUDGET_BASELINE} "
            f"(the same trainer honouring the budget) when a budget is given")


def seed_argument(text: str) -> int:
    """An argparse ``type`` for numpy's legacy seeds, 0 to 2**32 - 1 (the split's and the bootstrap's)."""
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"a seed must be an integer from 0 to {2**32 - 1}, got {text!r}")
    return seed


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
  DESAM_SAM_CHECKPOINT  official SAM checkpoint file; required when a DeSAM trainer is run, and
                        checked (its keys) before anything runs
  DESAM_GRID_SIZE       points per side of DeSAM-P's inference grid (default 9)
  DESAM_GRID_AGGREGATION  how DeSAM-P combines grid prompts: gated (default), mean, authors
  DESAM_BATCH_SIZE, DESAM_LEARNING_RATE   training batch size; the DeSAM trainers' learning rate
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
  predictions/, scores/, logs/   per-step outputs; logs/ holds every subprocess's whole output
                        (the console shows the step lines and the per-epoch lines)

Datasets are given by id (901) or name (Dataset901_SiteA).""",
    )
    parser.add_argument("-s", "--source", required=True, help="source dataset (training), id or name")
    parser.add_argument("-t", "--targets", required=True, nargs="+", metavar="TARGET", help="target datasets (testing only)")
    parser.add_argument("--methods", nargs="+", metavar="METHOD", help=_methods_help())
    parser.add_argument("-tr", "--trainers", nargs="+", metavar="TRAINER",
                        help="nnU-Net trainer classes to compare as further rows, after --methods (any trainer "
                             "nnU-Net finds; a class with a paper row is shown under its paper name)")
    parser.add_argument("--ablations", action="store_true",
                        help=f"also train the paper's Table 1 ablations: {', '.join(METHODS[k].trainer for k in ABLATION_ROWS)}")
    parser.add_argument("--upper-bound", action="store_true",
                        help="also train the baseline on each target (its own 9:1 split) and score it on that "
                             "target's held-out validation cases: the 'Upper bound' row of Table 2")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="whole-volume",
                        help="whole-volume: nnU-Net's evaluation (nnUNetv2_evaluate_folder), every slice (default); "
                             "foreground-slices: the paper's protocol, Dice over the slices with reference foreground")
    parser.add_argument("--grid-sizes", nargs="+", type=positive_int_argument, metavar="K",
                        help="also predict every target with DeSAM-P (nnUNetTrainerDeSAM) at DESAM_GRID_SIZE=K for each "
                             "K and plot Dice vs. grid size (Fig. 3), e.g. 3 5 9 16")
    parser.add_argument("--epochs", type=positive_int_argument, help="training epochs (sets DESAM_EPOCHS)")
    parser.add_argument("--iterations-per-epoch", type=positive_int_argument,
                        help="training iterations per epoch (sets DESAM_ITERATIONS_PER_EPOCH)")
    parser.add_argument("--val-iterations", type=positive_int_argument,
                        help="validation iterations per epoch (sets DESAM_VAL_ITERATIONS_PER_EPOCH)")
    parser.add_argument("-o", "--output", type=Path,
                        help="output folder (default: ./crossdomain_<source dataset name>)")
    parser.add_argument("-device", "--device", choices=("cuda", "cpu", "mps"),
                        help="device for training and prediction (default: cuda when available, else cpu)")
    parser.add_argument("-p", "--plans", default=DEFAULT_PLANS, metavar="PLANS",
                        help=f"nnU-Net plans identifier for training and prediction (default {DEFAULT_PLANS}, which the "
                             "command plans itself). Other plans must already exist for every dataset trained on, e.g. "
                             "from nnUNetv2_plan_experiment -overwrite_plans_name PLANS -overwrite_target_spacing ...; "
                             "the command then preprocesses with nnUNetv2_preprocess -plans_name PLANS")
    parser.add_argument("--split-seed", type=seed_argument, default=DEFAULT_SEED,
                        help=f"seed of the 9:1 source split (default {DEFAULT_SEED}, nnU-Net's)")
    parser.add_argument("--overwrite-split", action="store_true",
                        help="replace a splits_final.json that holds another split (e.g. nnU-Net's 5-fold split from "
                             "an earlier nnUNetv2_train) with the 9:1 split. Models trained on that dataset with the "
                             "old split become invalid (their validation cases may be training cases of the new "
                             "split); refused while this experiment's own model folders hold such a training")
    parser.add_argument("--seed", type=seed_argument, default=0, help="seed of the bootstrap confidence intervals (default 0)")
    parser.add_argument("--n-boot", type=positive_int_argument, default=1000,
                        help="bootstrap resamples of the confidence intervals (default 1000)")
    return parser


def describe(experiment: Experiment) -> str:
    """The summary printed before the first step."""
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
    if experiment.skipped:
        lines.append(f"left out: {'; '.join(experiment.skipped)}")
    if experiment.upper_bound:
        lines.append(f"upper bound: {experiment.baseline} trained on each target, scored on its validation cases")
    if experiment.grid_sizes:
        lines.append(f"grid sizes: {', '.join(map(str, experiment.grid_sizes))} (main grid {experiment.main_grid_size})")
    if any(experiment.uses_grid(trainer) for trainer in experiment.trainers):
        lines.append(f"grid:      {experiment.main_grid_size}×{experiment.main_grid_size} points, "
                     f"combined by '{experiment.grid_aggregation}'")
    if experiment.budget:
        ignoring = [trainer for trainer in experiment.trainers if not honours_budget(experiment.trainer_classes[trainer])]
        if ignoring:
            lines.append(f"warning:   not honouring the budget, trained on their own schedule: {', '.join(ignoring)} "
                         f"({BASELINE}: 1000 epochs; {BUDGET_BASELINE} honours the budget)")
    if SAM_CHECKPOINT_VARIABLE in experiment.environment:
        lines.append(f"SAM:       {experiment.environment[SAM_CHECKPOINT_VARIABLE]}")
    return "\n".join(lines)


def run_experiment(argv: Sequence[str] | None, environment: Mapping[str, str], notes: Sequence[str] = (),
                   figure_note: str = "") -> Experiment:
    """Parse ``argv``, check it, run every step not done yet. Raises ExperimentError or StepFailed."""
    args = build_parser().parse_args(argv)
    experiment = build_experiment(args, environment, notes, figure_note)
    experiment.output.mkdir(parents=True, exist_ok=True)
    print(f"{PROG}\n{describe(experiment)}", flush=True)
    start = time.monotonic()
    run_steps(plan_steps(experiment))
    print(f"\nDone in {time.monotonic() - start:.0f} s. Outputs in {experiment.output}: table.md, table.csv, "
          f"per_case.json, dice_bar_chart.png, overlays.png" + (", dice_vs_grid_size.png" if experiment.grid_sizes else ""))
    return experiment


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run_console_command(PROG, lambda: run_experiment(argv, dict(os.environ)), RESUME_HINT))


if __name__ == "__main__":
    main()
