"""``nnUNetv2_desam_demo``: the whole cross-domain workflow on synthetic data, on CPU, in minutes.

On a machine with nothing configured, it creates FOLDER with its own ``nnUNet_raw``,
``nnUNet_preprocessed`` and ``nnUNet_results`` and three synthetic domains
(:mod:`~nnunetv2_desam.experiments.synthetic`; SiteA is the source, SiteB and SiteC the targets),
then runs ``nnUNetv2_desam_crossdomain`` on them with DeSAM on the packaged LiteMedSAM (pretrained
on real medical images; the default encoder) and a budget sized to LiteMedSAM's cost on a 2-core
CPU: 30 iterations at batch 4 for every row (the DeSAM trainers at learning rate 1e-3), DeSAM-P
predicting with a 5×5 grid (the paper's 9×9 costs 9-13 s per slice there). Every
setting reaches the subprocesses through their environment only; the caller's shell and
environment variables are neither read for nnU-Net settings nor changed.

The features are real, the sites and the budget are not: the numbers show the workflow end to end
and how each method does on synthetic site shifts after a short training, not DeSAM's accuracy on
real scans. Every output says so.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from nnunetv2_desam.console import run_console_command
from nnunetv2_desam.environment_variables import (BATCH_SIZE_VARIABLE, GRID_SIZE_VARIABLE, LEARNING_RATE_VARIABLE,
                                                  positive_int_argument)
from nnunetv2_desam.errors import ExperimentError
from nnunetv2_desam.experiments.crossdomain.cli import RESUME_HINT, run_experiment
from nnunetv2_desam.experiments.crossdomain.experiment import NNUNET_FOLDERS
from nnunetv2_desam.experiments.synthetic import DEFAULT_DOMAINS, SyntheticDomain, write_synthetic_domains

PROG = "nnUNetv2_desam_demo"
FIRST_ID = 901
SEED = 0
SETTINGS_FILE = "demo.json"
LEARNING_RATE = 1e-3  # DeSAM trainers only (the paper's 1e-4 learns too slowly for 30 iterations); the baseline keeps nnU-Net's
DISCLAIMER = (
    "DEMO: synthetic sites and a short training. DeSAM runs on the packaged LiteMedSAM (pretrained on real CT, MR "
    "and other medical images), but every model trains for only 30 iterations at batch 4 (the DeSAM trainers at "
    "learning rate 1e-3, 10 times the paper's) on a handful of synthetic 3×64×64 volumes whose sites differ by "
    "intensity mapping, bias field and noise, and DeSAM-P predicts with a 5×5 grid, not the paper's 9×9. The table "
    "shows how each method copes with these synthetic site shifts after that short training; it says nothing about "
    "DeSAM's accuracy on real scans. For that, run nnUNetv2_desam_crossdomain on real data "
    "(documentation/crossdomain_workflow.md)."
)
FIGURE_NOTE = ("DEMO: synthetic sites, 30 iterations at batch 4, DeSAM on LiteMedSAM, DeSAM-P with a 5×5 grid. "
               "Not DeSAM's accuracy on real scans.")


@dataclass(frozen=True)
class DemoSettings:
    """What the demo writes and runs: the first domain is the source, the others are targets. The defaults are
    the demo's; the tests run the same workflow smaller."""

    shape: tuple[int, int, int] = (3, 64, 64)
    budget: dict = field(default_factory=lambda: {"epochs": 3, "iterations-per-epoch": 10, "val-iterations": 1})
    batch_size: int = 4  # at batch 2 (40 iterations) DeSAM-P's training collapsed to background in a measured run
    grid_size: int = 5  # DeSAM-P's inference grid
    grid_sizes: tuple[int, ...] = ()  # more grids for the Dice-vs-grid-size figure (none: each grid predicts every target again)
    domains: tuple[SyntheticDomain, ...] = DEFAULT_DOMAINS

    def record(self, num_cases: int) -> dict:
        """What a demo folder records in demo.json; a rerun resumes only with the same record."""
        return {"cases": num_cases, "shape": list(self.shape), "seed": SEED, "budget": self.budget,
                "batch_size": self.batch_size, "learning_rate": LEARNING_RATE, "grid_size": self.grid_size,
                "grid_sizes": list(self.grid_sizes), "domains": [domain.name for domain in self.domains],
                "encoder": "LiteMedSAM"}


class DemoError(ExperimentError):
    """A demo folder that cannot be used; printed as one line."""


class StepConsole(io.TextIOBase):
    """The demo's quiet console: what the experiment prints, reduced to one line per step.

    A step's header shows when it starts and its time completes the line when it ends (``[3/14] train … finished
    in 40 s``); a skipped step is its one ``skipped (done)`` line; a failing step's log tail passes.
    Everything else (the summary, the nnU-Net commands, nnU-Net's epoch lines) is in the experiment's logs;
    ``-v`` prints it all.
    """

    STEP = re.compile(r"^(\[\d+/\d+\] .*?)(: finished in \d+ s|: skipped \(done\))?$")
    FAILURE = ("  last lines of ", "  | ")

    def __init__(self, console):
        self.console, self.pending, self.open_step = console, "", None

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.show(line)
        return len(text)

    def show(self, line: str) -> None:
        step = self.STEP.match(line)
        if step and step.group(2) and step.group(1) == self.open_step:
            self.console.write(f"{step.group(2).removeprefix(': ')}\n")
            self.open_step = None
        elif step:
            self.end_open_step()
            if step.group(2):
                self.console.write(f"{line}\n")
            else:
                self.console.write(f"{line} … ")
                self.open_step = line
        elif line.startswith(self.FAILURE):
            self.end_open_step()
            self.console.write(f"{line}\n")
        self.console.flush()

    def end_open_step(self) -> None:
        if self.open_step is not None:
            self.console.write("\n")
            self.open_step = None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run DeSAM's cross-domain workflow (nnUNetv2_desam_crossdomain) end to end on synthetic data "
                    "on the CPU, with nothing configured: FOLDER gets its own nnU-Net folders, three synthetic "
                    "domains (SiteA source; SiteB, SiteC targets), the trainings (DeSAM on the packaged LiteMedSAM), "
                    "predictions, table and figures. About 15 minutes on two idle cores, longer on a busy machine. " + DISCLAIMER,
    )
    parser.add_argument("-o", "--output", type=Path, default=Path("desam_demo"), metavar="FOLDER",
                        help="demo folder (default: ./desam_demo); rerunning an interrupted demo (or one run with --keep) resumes")
    parser.add_argument("--cases", type=_at_least_two, default=4, metavar="N",
                        help="synthetic cases per domain (default 4; the source needs 2 for its 9:1 split)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print the experiment's summary, every nnU-Net command and nnU-Net's per-epoch lines "
                             "(default: one line per step; everything is in FOLDER/crossdomain/logs either way)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the nnU-Net raw, preprocessed and results folders (about 100 MB); by default only "
                             "the report folder crossdomain/ is kept")
    return parser


def _at_least_two(text: str) -> int:
    value = positive_int_argument(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 2, got {text!r}")
    return value


def prepare_folder(folder: Path, settings: dict) -> None:
    """Use an empty (or new) folder, or resume a demo made with the same settings; refuse anything else."""
    settings_file = folder / SETTINGS_FILE
    if folder.exists() and not folder.is_dir():
        raise DemoError(f"{folder} exists and is not a folder; choose another -o")
    if folder.is_dir() and any(folder.iterdir()):
        if not settings_file.is_file():
            raise DemoError(f"{folder} exists and is not a demo folder; choose another -o")
        try:
            previous = json.loads(settings_file.read_text())
        except ValueError:
            raise DemoError(f"{settings_file} is unreadable; remove {folder} or choose another -o") from None
        if previous != settings:
            raise DemoError(f"{folder} holds a demo made with {previous}; remove it or choose another -o")
        print(f"resuming the demo in {folder}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        settings_file.write_text(json.dumps(settings, indent=2))
    except OSError as error:
        raise DemoError(f"cannot write the demo folder {folder}: {error.strerror}; choose another -o") from None


def finished_without_nnunet_folders(folder: Path) -> bool:
    """A demo that ended and removed its nnU-Net folders (no ``--keep``): a rerun would have to retrain everything."""
    return (folder / "crossdomain" / "table.md").is_file() and not any((folder / name).exists() for name in NNUNET_FOLDERS)


def report_ignored_settings() -> None:
    """Say which of the caller's nnU-Net and DeSAM variables the demo does not use (it brings its own)."""
    ignored = sorted(name for name in os.environ if name.startswith(("DESAM_", "nnUNet_")) and name != "nnUNet_extTrainer")
    if ignored:
        print(f"ignoring {', '.join(ignored)} from your environment: the demo runs with its own settings")


def write_inputs(folder: Path, num_cases: int, settings: DemoSettings) -> None:
    """The synthetic raw datasets, written once (under a temporary name first, so an interrupted demo never
    resumes from half-written data)."""
    raw = folder / "nnUNet_raw"
    if not raw.is_dir():
        print(f"writing {len(settings.domains)} synthetic domains of {num_cases} cases "
              f"({'×'.join(map(str, settings.shape))})")
        partial = folder / "nnUNet_raw.partial"
        shutil.rmtree(partial, ignore_errors=True)
        write_synthetic_domains(partial, FIRST_ID, num_cases, domains=settings.domains, seed=SEED, shape=settings.shape)
        partial.rename(raw)


def demo_environment(folder: Path, settings: DemoSettings) -> dict:
    """The caller's environment without any nnU-Net or DeSAM setting, plus the demo's own (no
    ``DESAM_SAM_CHECKPOINT``: the trainers use the packaged LiteMedSAM)."""
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("nnUNet_", "DESAM_"))}
    environment.update({name: str(folder / name) for name in NNUNET_FOLDERS})
    environment.update({
        LEARNING_RATE_VARIABLE: str(LEARNING_RATE),
        BATCH_SIZE_VARIABLE: str(settings.batch_size),
        GRID_SIZE_VARIABLE: str(settings.grid_size),
        "nnUNet_def_n_proc": "1",  # tiny cases: extra spawned workers cost more than they save
        "nnUNet_n_proc_DA": "0",
    })
    return environment


def crossdomain_arguments(folder: Path, settings: DemoSettings) -> list[str]:
    targets = [str(FIRST_ID + i) for i in range(1, len(settings.domains))]
    budget = [item for option, value in settings.budget.items() for item in (f"--{option}", str(value))]
    grid_sizes = ["--grid-sizes", *map(str, settings.grid_sizes)] if settings.grid_sizes else []
    return ["-s", str(FIRST_ID), "-t", *targets, *budget, *grid_sizes, "-o", str(folder / "crossdomain"), "-device", "cpu"]


def remove_bulky_outputs(folder: Path) -> None:
    """Everything but the report folder (and the settings file, so a rerun is recognised as a demo)."""
    for name in NNUNET_FOLDERS:
        shutil.rmtree(folder / name, ignore_errors=True)


def run_demo(argv: Sequence[str] | None = None, settings: DemoSettings = DemoSettings()) -> None:
    """Prepare FOLDER, run the experiment in it, tidy up; the disclaimer first and last, and on every figure."""
    args = build_parser().parse_args(argv)
    folder = args.output.resolve()
    start = time.monotonic()
    print(f"{PROG}: {DISCLAIMER}\n", flush=True)
    prepare_folder(folder, settings.record(args.cases))
    if finished_without_nnunet_folders(folder):
        print(f"this demo has finished: report, figures and logs in {folder / 'crossdomain'}. Its nnU-Net folders were "
              f"removed, so running it again means training again: remove {folder} or choose another -o "
              "(--keep keeps what a rerun resumes from)")
        return
    report_ignored_settings()
    write_inputs(folder, args.cases, settings)
    with nullcontext() if args.verbose else redirect_stdout(StepConsole(sys.stdout)):
        experiment = run_experiment(crossdomain_arguments(folder, settings), demo_environment(folder, settings),
                                    notes=[DISCLAIMER], figure_note=FIGURE_NOTE)
    if not args.keep:
        remove_bulky_outputs(folder)
    print(f"\n{DISCLAIMER}\nDemo finished in {time.monotonic() - start:.0f} s; report, figures and logs in "
          f"{experiment.output}" + ("" if args.keep else " (nnU-Net folders removed; --keep keeps them)"), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run_console_command(PROG, lambda: run_demo(argv), RESUME_HINT))


if __name__ == "__main__":
    main()
