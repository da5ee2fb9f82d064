"""The one-command cross-domain experiment (and the demo's folder handling): refusals before anything
runs, and one real end-to-end run.

The end-to-end test runs the real nnU-Net commands on two tiny synthetic domains (5 cases of
4×48×48, 1 epoch × 2 iterations; about 3–4 minutes on two cores), then reruns the command to check
that nothing is redone, and once more with the paper's protocol, which only rescores. Every nnU-Net
folder lives in tmp_path.
"""
import csv
import json
import os
import time

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_desam.experiments import crossdomain, demo
from nnunetv2_desam.experiments.report import PROTOCOL_FOREGROUND_SLICES, PROTOCOL_WHOLE_VOLUME
from nnunetv2_desam.experiments.synthetic import DEFAULT_DOMAINS, LABELS, write_synthetic_domains

SOURCE, TARGET = "Dataset901_SiteA", "Dataset902_SiteB"
BUDGET = ["--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations", "1"]


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """nnU-Net's folders in tmp_path and no DESAM_* setting from the caller's shell."""
    for variable in crossdomain.NNUNET_FOLDERS:
        monkeypatch.setenv(variable, str(tmp_path / variable))
    for variable in ("DESAM_SAM_CHECKPOINT", "DESAM_GRID_SIZE", "DESAM_EPOCHS", "DESAM_ITERATIONS_PER_EPOCH",
                     "DESAM_VAL_ITERATIONS_PER_EPOCH", "nnUNet_extTrainer"):
        monkeypatch.delenv(variable, raising=False)
    return tmp_path


def write_domains(root, num_cases=2, shape=(2, 16, 16)):
    """SiteA (901) and SiteB (902) as raw datasets."""
    return write_synthetic_domains(root / "nnUNet_raw", 901, num_cases, domains=DEFAULT_DOMAINS[:2], shape=shape)


def run_main(argv):
    with pytest.raises(SystemExit) as exit_info:
        crossdomain.main(argv)
    return exit_info.value.code


def experiment(argv):
    """Parse and check ``argv`` against os.environ without running anything."""
    return crossdomain.build_experiment(crossdomain.build_parser().parse_args(argv), dict(os.environ))


def assert_one_line_error(capsys, code, expected_code, *fragments):
    error = capsys.readouterr().err.strip()
    assert code == expected_code
    assert len(error.splitlines()) == 1 and error.startswith(f"{crossdomain.PROG}: error: ")
    for fragment in fragments:
        assert fragment in error


def test_missing_nnunet_folders_are_named(nnunet_env, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw")
    monkeypatch.delenv("nnUNet_results")
    assert_one_line_error(capsys, run_main(["-s", "901", "-t", "902"]), 2, "nnUNet_raw", "nnUNet_results")


@pytest.mark.parametrize("source", ["999", "Dataset999_Nope", "not-a-dataset"])
def test_unknown_dataset_is_refused(nnunet_env, capsys, source):
    write_domains(nnunet_env)
    assert_one_line_error(capsys, run_main(["-s", source, "-t", "902"]), 2, source)


def test_label_mismatch_is_refused(nnunet_env, capsys):
    _, target = write_domains(nnunet_env)
    dataset_json = json.loads((target / "dataset.json").read_text())
    dataset_json["labels"] = {"background": 0, "organ_b": 1, "organ_a": 2}
    (target / "dataset.json").write_text(json.dumps(dataset_json))
    assert_one_line_error(capsys, run_main(["-s", "901", "-t", "902"]), 2, "labels", TARGET, SOURCE)


def test_source_too_small_to_split_is_refused(nnunet_env, capsys):
    write_domains(nnunet_env, num_cases=1)
    assert_one_line_error(capsys, run_main(["-s", "901", "-t", "902", "-tr", "nnUNetTrainer"]), 2, SOURCE, "2 cases")


def test_target_equal_to_source_is_refused(nnunet_env, capsys):
    write_domains(nnunet_env)
    assert_one_line_error(capsys, run_main(["-s", "901", "-t", SOURCE]), 2, "source")


def test_desam_trainers_need_the_sam_checkpoint(nnunet_env, capsys):
    write_domains(nnunet_env)
    assert_one_line_error(capsys, run_main(["-s", "901", "-t", "902"]), 2, "DESAM_SAM_CHECKPOINT")


def test_missing_sam_checkpoint_file_is_refused(nnunet_env, monkeypatch, capsys):
    write_domains(nnunet_env)
    monkeypatch.setenv("DESAM_SAM_CHECKPOINT", str(nnunet_env / "absent.pth"))
    assert_one_line_error(capsys, run_main(["-s", "901", "-t", "902"]), 2, "absent.pth")


def test_baseline_alone_needs_no_sam_checkpoint(nnunet_env):
    write_domains(nnunet_env)
    assert experiment(["-s", "901", "-t", "902", "-tr", "nnUNetTrainer"]).trainers == ["nnUNetTrainer"]


def test_unknown_trainer_is_refused(nnunet_env, capsys):
    write_domains(nnunet_env)
    assert_one_line_error(capsys, run_main(["-s", "901", "-t", "902", "-tr", "nnUNetTrainerDeSAM_box"]), 2,
                          "nnUNetTrainerDeSAM_box")


def test_grid_sizes_need_desam_p(nnunet_env, capsys, tiny_sam_checkpoint, monkeypatch):
    write_domains(nnunet_env)
    monkeypatch.setenv("DESAM_SAM_CHECKPOINT", str(tiny_sam_checkpoint))
    code = run_main(["-s", "901", "-t", "902", "-tr", "nnUNetTrainerDeSAM_Box", "--grid-sizes", "3"])
    assert_one_line_error(capsys, code, 2, "--grid-sizes")


def test_default_trainers_and_baseline_choice(nnunet_env, tiny_sam_checkpoint, monkeypatch):
    """nnU-Net's own trainer without a budget; with one (option or DESAM_* variable) the trainer that honours it."""
    write_domains(nnunet_env)
    monkeypatch.setenv("DESAM_SAM_CHECKPOINT", str(tiny_sam_checkpoint))
    assert experiment(["-s", "901", "-t", "902"]).trainers == ["nnUNetTrainer", "nnUNetTrainerDeSAM_Box",
                                                               "nnUNetTrainerDeSAM"]
    budgeted = experiment(["-s", "901", "-t", "902", "--epochs", "2", "--ablations"])
    assert budgeted.trainers == ["nnUNetTrainerBudget", "nnUNetTrainerDeSAM_Box", "nnUNetTrainerDeSAM",
                                 *crossdomain.ABLATIONS]
    assert budgeted.environment["DESAM_EPOCHS"] == "2"
    monkeypatch.setenv("DESAM_ITERATIONS_PER_EPOCH", "3")
    assert experiment(["-s", "901", "-t", "902"]).baseline == "nnUNetTrainerBudget"


def test_display_names_fall_back_to_class_names_when_they_collide():
    names = crossdomain.display_names(["nnUNetTrainer", "nnUNetTrainerBudget", "nnUNetTrainerDeSAM"],
                                      lambda trainer: crossdomain.METHOD_NAMES[trainer])
    assert names == {"nnUNetTrainer": "nnUNetTrainer", "nnUNetTrainerBudget": "nnUNetTrainerBudget",
                     "nnUNetTrainerDeSAM": "DeSAM-P"}


def test_upper_bound_plans_a_target_training_and_its_validation_cases(nnunet_env):
    write_domains(nnunet_env)
    titles = [step.title for step in crossdomain.plan_steps(
        experiment(["-s", "901", "-t", "902", "-tr", "nnUNetTrainerBudget", "--upper-bound", *BUDGET]))]
    assert f"preprocess {TARGET} (2d)" in titles
    assert f"train nnUNetTrainerBudget on {TARGET}" in titles
    assert f"predict the validation cases of {TARGET} with nnUNetTrainerBudget trained on {TARGET}" in titles


def test_finished_training_with_another_budget_is_refused(nnunet_env, capsys):
    write_domains(nnunet_env)
    fold = nnunet_env / "nnUNet_results" / SOURCE / "nnUNetTrainerBudget__nnUNetPlans__2d" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pth").touch()
    (fold / "debug.json").write_text(json.dumps({"num_epochs": "1000", "batch_size": "2"}))
    code = run_main(["-s", "901", "-t", "902", "-tr", "nnUNetTrainerBudget", *BUDGET])
    assert_one_line_error(capsys, code, 2, "num_epochs=1000", str(fold))


def test_failing_step_names_step_command_and_log(nnunet_env, monkeypatch, capsys):
    write_domains(nnunet_env)
    monkeypatch.setattr(crossdomain, "console_script", lambda name: "false")
    code = run_main(["-s", "901", "-t", "902", "-tr", "nnUNetTrainer", "-o", str(nnunet_env / "out")])
    log = nnunet_env / "out" / "logs" / f"preprocess_{SOURCE}.log"
    assert_one_line_error(capsys, code, 1, f"preprocess {SOURCE}", "nnUNetv2_plan_and_preprocess -d 901", str(log))
    assert log.is_file()


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path, capsys):
    (tmp_path / "thesis.tex").touch()
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["-o", str(tmp_path)])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and error.startswith(f"{demo.PROG}: error: ") and "not a demo folder" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


def test_demo_environment_ignores_the_callers_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", "/somebody/elses/results")
    monkeypatch.setenv("DESAM_EPOCHS", "1000")
    environment = demo.demo_environment(tmp_path, tmp_path / demo.SAM_FILE)
    assert environment["nnUNet_results"] == str(tmp_path / "nnUNet_results")
    assert environment["DESAM_SAM_CHECKPOINT"] == str(tmp_path / demo.SAM_FILE)
    assert "DESAM_EPOCHS" not in environment


def test_end_to_end_and_resume(nnunet_env, tiny_sam_checkpoint, monkeypatch, capsys):
    """Baseline, DeSAM-B and DeSAM-P from one source to one target, the report and both figures; then a
    rerun that redoes nothing, and one with the paper's protocol that only rescores. The main grid is 3×3
    so that ``--grid-sizes 2 3`` adds one prediction."""
    write_domains(nnunet_env, num_cases=5, shape=(4, 48, 48))
    monkeypatch.setenv("DESAM_SAM_CHECKPOINT", str(tiny_sam_checkpoint))
    monkeypatch.setenv("DESAM_GRID_SIZE", "3")
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    output = nnunet_env / "out"
    argv = ["-s", "901", "-t", "902", *BUDGET, "-o", str(output), "-device", "cpu", "--grid-sizes", "2", "3"]

    assert run_main(argv) == 0
    first = capsys.readouterr().out
    assert "[3/" in first and f"train nnUNetTrainerDeSAM on {SOURCE}" in first
    check_outputs(output, nnunet_env / "nnUNet_raw" / TARGET)

    start = time.monotonic()
    assert run_main(argv) == 0
    second = capsys.readouterr().out
    step_lines = [line for line in second.splitlines() if line.startswith("[")]
    work = [line for line in step_lines if not line.split("] ", 1)[1].startswith(("write the report", "draw the"))]
    assert work and all(line.endswith("skipped (done)") for line in work)
    assert "$ nnUNetv2_" not in second
    assert time.monotonic() - start < 60

    assert run_main(argv + ["--protocol", "foreground-slices"]) == 0
    third = capsys.readouterr().out
    assert "$ nnUNetv2_" not in third and "predict" in third
    assert all(line.endswith("skipped (done)") for line in third.splitlines() if line.startswith("[") and "predict " in line)
    assert PROTOCOL_FOREGROUND_SLICES in (output / "table.md").read_text()
    assert json.loads((output / "per_case.json").read_text())["protocol"] == PROTOCOL_FOREGROUND_SLICES


def check_outputs(output, target_folder):
    methods = ["Baseline", "DeSAM-B", "DeSAM-P"]
    cases = sorted(p.name[:-len(".nii.gz")] for p in (target_folder / "labelsTr").iterdir())
    table = (output / "table.md").read_text()
    assert PROTOCOL_WHOLE_VOLUME in table
    for method in methods:
        assert f"| {method} |" in table
    for trainer in ("nnUNetTrainerBudget", "nnUNetTrainerDeSAM_Box", "nnUNetTrainerDeSAM"):
        assert f"= {trainer} (1 epochs × 2 iterations" in table
    assert "| Method | SiteA (in-domain) | SiteB | Overall |" in table and "checkpoint_best.pth" in table
    assert "In-domain column: every method on those 1 validation case(s) of the source" in table

    with open(output / "table.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert {(row["trainer"], row["target"], row["class"]) for row in rows} == {
        (method, target, name) for method in methods
        for target in ("SiteA (in-domain)", "SiteB") for name in ("organ_a", "organ_b", "mean over classes")} | {
        (method, "Overall", "mean over classes") for method in methods}
    assert all(row["protocol"] == PROTOCOL_WHOLE_VOLUME for row in rows)

    per_case = json.loads((output / "per_case.json").read_text())
    assert per_case["protocol"] == PROTOCOL_WHOLE_VOLUME
    assert {(row["trainer"], row["target"], row["class"]) for row in per_case["rows"]} == {
        (method, target, name) for method in methods for target in ("SiteA (in-domain)", "SiteB")
        for name in ("organ_a", "organ_b")}
    assert all(sorted(row["per_case"]) == cases for row in per_case["rows"] if row["target"] == "SiteB")
    splits = target_folder.parents[1] / "nnUNet_preprocessed" / SOURCE / "splits_final.json"
    validation = json.loads(splits.read_text())[0]["val"]
    assert all(sorted(row["per_case"]) == validation for row in per_case["rows"] if row["in_domain"])

    for png in ("dice_bar_chart.png", "overlays.png", "dice_vs_grid_size.png"):
        image = matplotlib.image.imread(output / png)
        assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0

    with open(output / "dice_vs_grid_size.csv", newline="") as file:
        assert {row["trainer"] for row in csv.DictReader(file)} == {"2×2 grid", "3×3 grid"}

    for key in ("nnUNetTrainerBudget", "nnUNetTrainerDeSAM_Box", "nnUNetTrainerDeSAM", "grid_size_2"):
        folder = output / "predictions" / key / TARGET
        for case in cases:
            labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}.nii.gz")))
            reference = sitk.GetArrayFromImage(sitk.ReadImage(str(target_folder / "labelsTr" / f"{case}.nii.gz")))
            assert labels.shape == reference.shape
            assert set(np.unique(labels)) <= set(LABELS.values())
