"""The report: the table files and the notes a reader of the table needs (names, split, model choice,
budgets, inference settings), written under the table's title and printed with it."""
from __future__ import annotations

from nnunetv2_desam.environment_variables import GRID_AGGREGATION_VARIABLE, GRID_SIZE_VARIABLE
from nnunetv2_desam.experiments import report
from nnunetv2_desam.experiments.crossdomain.experiment import CHECKPOINT, CONFIGURATION, FOLD, Experiment, training_record
from nnunetv2_desam.experiments.crossdomain.methods import BUDGET_BASELINE, UPPER_BOUND
from nnunetv2_desam.experiments.crossdomain.predictions import collect_results, table_predictions
from nnunetv2_desam.experiments.splits import compute_source_split


def describe_training(record: dict) -> str:
    """What a row was trained with, "E epochs × I iterations, batch B, lr L", from :func:`training_record`."""
    if not record:
        return "no debug.json"
    described = (f"{record.get('num_epochs', '?')} epochs × {record.get('num_iterations_per_epoch', '?')} iterations, "
                 f"batch {record.get('batch_size', '?')}")
    return described + (f", lr {record['initial_lr']:g}" if "initial_lr" in record else "")


def report_notes(experiment: Experiment) -> list[str]:
    """What a reader of the table needs to know: names, split, model choice, budgets, inference settings."""
    split = compute_source_split(experiment.source.cases, experiment.split_seed)
    trained = lambda dataset, trainer: describe_training(training_record(experiment.model_folder(dataset, trainer)))
    notes = list(experiment.notes) + [
        f"Source: {experiment.source.name}, split 9:1 (seed {experiment.split_seed}): {len(split['train'])} training, "
        f"{len(split['val'])} in-domain validation cases.",
        f"In-domain column: every method on those {len(split['val'])} validation case(s) of the source, same "
        f"checkpoint; {report.OVERALL} averages the target domains only.",
        "Targets, every case scored: " + "; ".join(
            f"{experiment.domain_names[t.name]} = {t.name} ({len(t.cases)} cases)" for t in experiment.targets) + ".",
        "Methods (nnU-Net trainer, training budget and initial learning rate from its debug.json): " + "; ".join(
            f"{experiment.method_names[trainer]} = {trainer} ({trained(experiment.source, trainer)})"
            for trainer in experiment.trainers) + ".",
        f"Model: fold {FOLD}, {CHECKPOINT}, which nnU-Net keeps as the best EMA pseudo-Dice on the in-domain "
        f"validation split (the paper's 'best model on the in-domain validation set'); plans {experiment.plans}, "
        f"configuration {CONFIGURATION}.",
    ]
    if experiment.skipped:
        notes.append(f"Rows of the paper's tables not run (trainer not installed): {'; '.join(experiment.skipped)}.")
    if experiment.baseline == BUDGET_BASELINE:
        notes.append(f"Baseline: {BUDGET_BASELINE} is the stock nnUNetTrainer with the same epochs and iterations as "
                     f"the DeSAM trainers (batch size: DESAM_BATCH_SIZE where set, else nnU-Net's plans; see above), not "
                     f"nnU-Net's 1000 epochs.")
    if experiment.upper_bound:
        notes.append(f"{UPPER_BOUND.name}: {experiment.baseline} trained on each target's own 9:1 split, scored on "
                     f"that target's held-out validation cases only (n_cases in table.csv), not on every case; "
                     + "; ".join(f"{experiment.domain_names[t.name]}: {trained(t, experiment.baseline)}"
                                 for t in experiment.targets) + ".")
    if experiment.protocol == "foreground-slices":
        notes.append("Protocol: Dice over the slices (first image axis) where the reference has foreground, as the "
                     "authors score, with their border zeroing: 50/256 of each slice axis (their 50 px on 256² slices) "
                     "set to background in the prediction, not in the reference.")
    if any(experiment.uses_grid(trainer) for trainer in experiment.trainers):
        notes.append(f"Inference: point-prompt DeSAM trainers with a {experiment.main_grid_size}×"
                     f"{experiment.main_grid_size} grid ({GRID_SIZE_VARIABLE}), prompts combined by "
                     f"'{experiment.grid_aggregation}' ({GRID_AGGREGATION_VARIABLE}"
                     + ("; prompts with predicted IoU ≤ 0.5 do not count, a tile where none passes is background)."
                        if experiment.grid_aggregation == "gated" else ")."))
    notes.append("nnU-Net trainers train and predict with nnU-Net's mirroring; DeSAM trainers without it "
                 "(their setting).")
    return notes


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
    report.plot_bar_chart(results, str(output / "dice_bar_chart.png"), note=experiment.figure_note)
    print("\n" + "\n".join(notes) + "\n\n" + report.format_table(results), flush=True)
