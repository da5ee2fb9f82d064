"""The one-command cross-domain experiment and the demo: refusals before anything runs, the rows
(``--methods``), the split and SAM-file checks, the console filter, and one real end-to-end run.

The end-to-end test runs the demo's workflow smaller (two synthetic domains of 3 cases of 3×48×48,
1 epoch × 2 iterations at batch 2, DeSAM on the packaged LiteMedSAM; about 4–5 minutes on two cores) with the real nnU-Net commands, then the
cross-domain command in the demo's folders with ``--upper-bound`` (only the upper bound's steps run),
once more with the paper's protocol (only rescoring) and the demo once more (nothing is redone).
Every nnU-Net folder lives in tmp_path.
"""
import csv
import io
import json
import os

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_desam.experiments import demo
from nnunetv2_desam.experiments.crossdomain import cli, experiment as crossdomain_experiment, methods, report_notes, steps, subprocess_runner
from nnunetv2_desam.errors import ExperimentError, StepFailed
from nnunetv2_desam.experiments.report import PROTOCOL_FOREGROUND_SLICES, PROTOCOL_WHOLE_VOLUME
from nnunetv2_desam.experiments.synthetic import DEFAULT_DOMAINS, LABELS, write_synthetic_domains
from tests.commands import run

SOURCE, TARGET = "Dataset901_SiteA", "Dataset902_SiteB"
BUDGET = ["--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations", "1"]


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """nnU-Net's folders in tmp_path and no DESAM_* setting from the caller's shell."""
    for variable in crossdomain_experiment.NNUNET_FOLDERS:
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
        cli.main(argv)
    return exit_info.value.code


def experiment(argv):
    """Parse and check ``argv`` against os.environ without running anything."""
    return crossdomain_experiment.build_experiment(cli.build_parser().parse_args(argv), dict(os.environ))


def assert_one_line_error(capsys, code, expected_code, *fragments):
    error = capsys.readouterr().err.strip()
    assert code == expected_code
    assert len(error.splitlines()) == 1 and error.startswith(f"{cli.PROG}: error: ")
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


def test_desam_trainers_without_the_variable_are_checked_against_the_packaged_lite_medsam(nnunet_env, capsys):
    """Unset, the trainers will use the packaged LiteMedSAM: the up-front check reads (and verifies) that file."""
    from nnunetv2_desam.networks import default_sam_checkpoint

    write_domains(nnunet_env)
    default_sam_checkpoint.packaged_litemedsam.cache_clear()
    assert "nnUNetTrainerDeSAM" in experiment(["-s", "901", "-t", "902"]).trainers
    assert "DESAM_SAM_CHECKPOINT is unset: using the packaged LiteMedSAM" in capsys.readouterr().out


def test_missing_sam_checkpoint_file_is_refused(nnunet_env, monkeypatch, capsys):
    write_domains(nnunet_env)
    monkeypatch.setenv("DESAM_SAM_CHECKPOINT", str(nnunet_env / "absent.pth"))
    assert_one_line_error(capsys, run_main(["-s", "901", "-t", "902"]), 2, "absent.pth")


def test_baseline_alone_needs_no_sam_checkpoint(nnunet_env):
    write_domains(nnunet_env)
    assert experiment(["-s", "901", "-t", "902", "-tr", "nnUNetTrainer"]).trainers == ["nnUNetTrainer"]


@pytest.mark.parametrize("option", ["--split-seed", "--seed"])
def test_a_seed_numpy_cannot_take_is_a_usage_error(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["-s", "901", "-t", "902", option, "-3"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "a seed must be an integer from 0 to 4294967295, got '-3'" in error
    assert "Traceback" not in error


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
                                 "nnUNetTrainerDeSAM_PDMMOnly", "nnUNetTrainerDeSAM_NoIoUHead",
                                 "nnUNetTrainerDeSAM_NoMEF"]
    assert budgeted.environment["DESAM_EPOCHS"] == "2"
    monkeypatch.setenv("DESAM_ITERATIONS_PER_EPOCH", "3")
    assert experiment(["-s", "901", "-t", "902"]).baseline == "nnUNetTrainerBudget"


def test_display_names_fall_back_to_class_names_when_they_collide():
    names = methods.display_names(["nnUNetTrainer", "nnUNetTrainerBudget", "nnUNetTrainerDeSAM"], methods.paper_name)
    assert names == {"nnUNetTrainer": "nnUNetTrainer", "nnUNetTrainerBudget": "nnUNetTrainerBudget",
                     "nnUNetTrainerDeSAM": "DeSAM-P"}


def test_upper_bound_plans_a_target_training_and_its_validation_cases(nnunet_env):
    write_domains(nnunet_env)
    titles = [step.title for step in steps.plan_steps(
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


def test_the_table_notes_say_what_each_row_trained_with(tmp_path):
    (tmp_path / "debug.json").write_text(json.dumps({"num_epochs": "10", "num_iterations_per_epoch": "50", "batch_size": "4",
                                                     "initial_lr": "0.0001", "optimizer": "Adam (...)"}))
    record = crossdomain_experiment.training_record(tmp_path)
    assert record == {"num_epochs": 10, "num_iterations_per_epoch": 50, "batch_size": 4, "initial_lr": 1e-4}
    assert report_notes.describe_training(record) == "10 epochs × 50 iterations, batch 4, lr 0.0001"
    (tmp_path / "debug.json").write_text(json.dumps({"num_epochs": "10", "initial_lr": "unknown"}))
    assert report_notes.describe_training(crossdomain_experiment.training_record(tmp_path)) == "10 epochs × ? iterations, batch ?"


def test_plans_of_ones_own_must_exist_before_anything_runs(nnunet_env, capsys):
    write_domains(nnunet_env)
    code = run_main(["-s", "901", "-t", "902", "-tr", "nnUNetTrainerBudget", "-p", "nnUNetPlans_coarse", *BUDGET])
    missing = nnunet_env / "nnUNet_preprocessed" / SOURCE / "nnUNetPlans_coarse.json"
    assert_one_line_error(capsys, code, 2, "plans nnUNetPlans_coarse not found", str(missing),
                          "nnUNetv2_plan_experiment -d 901 -overwrite_plans_name nnUNetPlans_coarse")


def test_the_experiment_trains_and_predicts_with_ones_own_plans(nnunet_env, capsys, monkeypatch):
    """Plans made with nnU-Net's own commands (a coarser spacing), then the experiment with -p: nnUNetv2_preprocess
    with those plans, training, prediction and scoring in the plans' model folder. Then an interrupted prediction
    continues: its finished case is kept, a missing and a cut-off one are predicted again."""
    write_domains(nnunet_env, num_cases=3)
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    planning = {**os.environ, "nnUNet_n_proc_DA": "1"}
    run(["nnUNetv2_extract_fingerprint", "-d", "901", "-np", "1"], planning)
    run(["nnUNetv2_plan_experiment", "-d", "901", "-overwrite_plans_name", "nnUNetPlans_coarse",
         "-overwrite_target_spacing", "2", "2", "2"], planning)
    argv = ["-s", "901", "-t", "902", "-tr", "nnUNetTrainerBudget", "-p", "nnUNetPlans_coarse", *BUDGET, "-device", "cpu",
            "-o", str(nnunet_env / "out")]
    assert run_main(argv) == 0
    commands = [line.split("$ ", 1)[1] for line in capsys.readouterr().out.splitlines() if line.startswith("  $ ")]
    programs = [next(word for word in command.split() if word.startswith("nnUNetv2_")) for command in commands]
    assert programs[:2] == ["nnUNetv2_preprocess", "nnUNetv2_train"] and "nnUNetv2_plan_and_preprocess" not in programs
    assert programs.count("nnUNetv2_predict") == 2  # the source's validation cases and the target
    assert all(("-plans_name nnUNetPlans_coarse" if program == "nnUNetv2_preprocess" else "-p nnUNetPlans_coarse") in command
               for program, command in zip(programs, commands) if program != "nnUNetv2_evaluate_folder")
    model = nnunet_env / "nnUNet_results" / SOURCE / "nnUNetTrainerBudget__nnUNetPlans_coarse__2d"
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()
    assert json.loads((model / "plans.json").read_text())["configurations"]["2d"]["spacing"] == [2.0, 2.0]
    assert not (nnunet_env / "nnUNet_results" / SOURCE / "nnUNetTrainerBudget__nnUNetPlans__2d").exists()
    assert "| Baseline |" in (nnunet_env / "out" / "table.md").read_text()

    # An interrupted target prediction: one case never written, one cut off mid-write, one finished.
    predicted = nnunet_env / "out" / "predictions" / "nnUNetTrainerBudget" / TARGET
    missing, cut_off, finished = sorted(predicted.glob("*.nii.gz"))
    missing.unlink()
    cut_off.write_bytes(cut_off.read_bytes()[:40])
    finished_bytes, finished_mtime = finished.read_bytes(), finished.stat().st_mtime_ns
    assert run_main(argv) == 0
    out = capsys.readouterr().out
    assert "continuing the interrupted prediction: 1 of 3 cases kept (--continue_prediction)" in out
    resumed = [line for line in out.splitlines() if line.startswith("  $ nnUNetv2_predict")]
    assert len(resumed) == 1 and resumed[0].endswith("--continue_prediction") and str(predicted) in resumed[0]
    assert finished.stat().st_mtime_ns == finished_mtime and finished.read_bytes() == finished_bytes
    for path in (missing, cut_off):
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).shape == (2, 16, 16)


def test_failing_step_names_step_command_and_log(nnunet_env, monkeypatch, capsys):
    write_domains(nnunet_env)
    monkeypatch.setattr(subprocess_runner, "console_script", lambda name: "false")
    code = run_main(["-s", "901", "-t", "902", "-tr", "nnUNetTrainer", "-o", str(nnunet_env / "out")])
    log = nnunet_env / "out" / "logs" / f"preprocess_{SOURCE}.log"
    assert_one_line_error(capsys, code, 1, f"preprocess {SOURCE}", "nnUNetv2_plan_and_preprocess -d 901", str(log))
    assert log.is_file()


def write_trainer(folder, name, base="nnUNetTrainerBudget"):
    """A trainer file in a folder for nnUNet_extTrainer, as another package would ship one."""
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(f"from nnunetv2_desam.trainers.{base} import {base}\n\n\n"
                                       f"class {name}({base}):\n    pass\n")


def test_methods_follow_the_paper_and_leave_out_trainers_not_installed(nnunet_env, tiny_sam_checkpoint, monkeypatch):
    """A row is one registry entry: its trainer, once nnU-Net finds it, joins ``--methods table2`` in the paper's
    order under its paper name; a row of the table whose trainer is not installed is left out with a note."""
    write_domains(nnunet_env)
    monkeypatch.setenv("DESAM_SAM_CHECKPOINT", str(tiny_sam_checkpoint))
    write_trainer(nnunet_env / "ext", "nnUNetTrainerAdvBias")
    monkeypatch.setenv("nnUNet_extTrainer", str(nnunet_env / "ext"))
    monkeypatch.setitem(methods.METHODS, "future", methods.Method("future", "Future", "nnUNetTrainerFuture"))
    monkeypatch.setitem(methods.TABLE_ROWS, "table2", ("upper-bound", "baseline", "advbias", "future", "desam-b",
                                                       "desam-p"))
    built = experiment(["-s", "901", "-t", "902", "--methods", "table2", "--epochs", "1"])
    assert built.trainers == ["nnUNetTrainerBudget", "nnUNetTrainerAdvBias", "nnUNetTrainerDeSAM_Box",
                              "nnUNetTrainerDeSAM"]
    assert built.upper_bound and built.skipped == ("Future (nnUNetTrainerFuture is not installed)",)
    assert built.method_names["nnUNetTrainerAdvBias"] == "AdvBias"
    assert methods.honours_budget(built.trainer_classes["nnUNetTrainerAdvBias"])
    assert not methods.needs_sam_checkpoint(built.trainer_classes["nnUNetTrainerAdvBias"])
    assert "left out: Future (nnUNetTrainerFuture is not installed)" in cli.describe(built)
    assert "nnUNet_extTrainer" not in os.environ or os.environ["nnUNet_extTrainer"] == str(nnunet_env / "ext")


def test_methods_by_name_and_table1_order(nnunet_env, tiny_sam_checkpoint, monkeypatch, capsys):
    write_domains(nnunet_env)
    monkeypatch.setenv("DESAM_SAM_CHECKPOINT", str(tiny_sam_checkpoint))
    assert experiment(["-s", "901", "-t", "902", "--methods", "table1"]).trainers == [
        "nnUNetTrainerDeSAM_PDMMOnly", "nnUNetTrainerDeSAM_NoIoUHead", "nnUNetTrainerDeSAM_NoMEF", "nnUNetTrainerDeSAM"]
    assert experiment(["-s", "901", "-t", "902", "--methods", "DeSAM-P", "Baseline"]).trainers == [
        "nnUNetTrainerDeSAM", "nnUNetTrainer"]
    monkeypatch.setitem(methods.METHODS, "future", methods.Method("future", "Future", "nnUNetTrainerFuture"))
    assert_one_line_error(capsys, run_main(["-s", "901", "-t", "902", "--methods", "future"]), 2,
                          "nnUNetTrainerFuture", "not installed")
    assert_one_line_error(capsys, run_main(["-s", "901", "-t", "902", "--methods", "table3"]), 2, "table3", "table2")


def test_a_split_from_an_earlier_training_needs_overwrite_split(nnunet_env, capsys):
    """nnUNetv2_train leaves nnU-Net's 5-fold split behind; the command names its own way out, and refuses it
    while one of its model folders learnt from the old split."""
    write_domains(nnunet_env, num_cases=5)
    split_file = nnunet_env / "nnUNet_preprocessed" / SOURCE / "splits_final.json"
    split_file.parent.mkdir(parents=True)
    split_file.write_text(json.dumps([{"train": ["SiteA_000", "SiteA_001", "SiteA_002", "SiteA_003"],
                                       "val": ["SiteA_004"]}] * 5))
    argv = ["-s", "901", "-t", "902", "-tr", "nnUNetTrainer"]
    assert_one_line_error(capsys, run_main(argv), 2, str(split_file), "--overwrite-split", "no longer valid")
    fold = nnunet_env / "nnUNet_results" / SOURCE / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pth").touch()
    assert_one_line_error(capsys, run_main(argv + ["--overwrite-split"]), 2, "--overwrite-split", str(fold))
    (fold / "checkpoint_final.pth").unlink()
    built = experiment(argv + ["--overwrite-split"])
    split_step = steps.preparation_steps(built, built.source)[1]
    assert not split_step.done()
    built.overwrite_split = False  # a split written after the checks: the step names the way out too
    with pytest.raises(ExperimentError, match="--overwrite-split"):
        split_step.run()
    built.overwrite_split = True
    split_step.run()
    assert split_step.done() and len(json.loads(split_file.read_text())) == 1


def test_a_file_that_is_not_a_sam_checkpoint_is_refused_before_anything_runs(nnunet_env, monkeypatch, capsys):
    torchvision = pytest.importorskip("torchvision")
    write_domains(nnunet_env)
    resnet = nnunet_env / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet)
    monkeypatch.setenv("DESAM_SAM_CHECKPOINT", str(resnet))
    output = nnunet_env / "out"
    assert_one_line_error(capsys, run_main(["-s", "901", "-t", "902", "-o", str(output)]), 2,
                          str(resnet), "is not a SAM checkpoint")
    assert not output.exists() and not (nnunet_env / "nnUNet_preprocessed").exists()


def test_a_directory_as_sam_checkpoint_gets_its_own_message(nnunet_env, monkeypatch, capsys, tiny_sam_checkpoint):
    write_domains(nnunet_env)
    monkeypatch.setenv("DESAM_SAM_CHECKPOINT", str(tiny_sam_checkpoint.parent))
    assert_one_line_error(capsys, run_main(["-s", "901", "-t", "902"]), 2, "is a directory",
                          str(tiny_sam_checkpoint))


def test_console_shows_epoch_lines_while_the_log_keeps_everything(tmp_path, monkeypatch, capsys):
    """A step's console output is nnU-Net's per-epoch lines; its log holds the whole output. A failing step
    shows the log's last lines."""
    script = tmp_path / "fake_nnunet"
    script.write_text("#!/bin/sh\necho '###### Please cite the following paper'\necho '{\"plans\": 1}'\n"
                      "echo '2024-05-01 12:00:00.123456: Epoch 0'\necho '2024-05-01 12:00:01.5: train_loss -0.5'\n"
                      "echo 'UserWarning: the same warning in every subprocess'\necho 'Traceback: it broke'\n"
                      "exit \"$1\"\n")
    script.chmod(0o755)
    monkeypatch.setattr(subprocess_runner, "console_script", lambda name: str(script))
    log = tmp_path / "logs" / "step.log"
    subprocess_runner.run_logged("a step", ["fake_nnunet", "0"], log, dict(os.environ))
    shown = capsys.readouterr().out.splitlines()
    assert shown[2:] == ["    Epoch 0", "    train_loss -0.5"]
    logged = log.read_text()
    for line in ("Please cite", '{"plans": 1}', "12:00:00.123456: Epoch 0", "UserWarning", "Traceback"):
        assert line in logged
    with pytest.raises(StepFailed, match="a step"):
        subprocess_runner.run_logged("a step", ["fake_nnunet", "3"], log, dict(os.environ))
    assert "  | Traceback: it broke" in capsys.readouterr().out


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path, capsys):
    (tmp_path / "thesis.tex").touch()
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["-o", str(tmp_path)])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and error.startswith(f"{demo.PROG}: error: ") and "not a demo folder" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_demo_refuses_an_output_it_cannot_use_in_one_line(tmp_path, capsys, where):
    (tmp_path / "notes.txt").write_text("mine")
    output = tmp_path / "notes.txt" if where == "a file" else tmp_path / "notes.txt" / "demo"
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["-o", str(output)])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(error.splitlines()) == 1 and error.startswith(f"{demo.PROG}: error: ")
    assert str(output) in error and "choose another -o" in error
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_demo_environment_ignores_the_callers_settings_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_results", "/somebody/elses/results")
    monkeypatch.setenv("DESAM_EPOCHS", "1000")
    monkeypatch.setenv("DESAM_GRID_SIZE", "abc")
    monkeypatch.setenv("DESAM_SAM_CHECKPOINT", "/somebody/elses/sam.pth")
    environment = demo.demo_environment(tmp_path, demo.DemoSettings(batch_size=3))
    assert environment["nnUNet_results"] == str(tmp_path / "nnUNet_results")
    assert "DESAM_SAM_CHECKPOINT" not in environment and environment["DESAM_BATCH_SIZE"] == "3"
    assert environment["DESAM_GRID_SIZE"] == "5"  # the demo's, not the caller's "abc"
    assert "DESAM_EPOCHS" not in environment
    demo.report_ignored_settings()
    notice = capsys.readouterr().out
    assert "DESAM_EPOCHS, DESAM_GRID_SIZE, DESAM_SAM_CHECKPOINT" in notice and "nnUNet_results" in notice and "its own settings" in notice


SMALL_DEMO = demo.DemoSettings(shape=(3, 48, 48), budget={"epochs": 1, "iterations-per-epoch": 2, "val-iterations": 1},
                               batch_size=2, grid_size=3, grid_sizes=(2, 3), domains=DEFAULT_DOMAINS[:2])


def test_the_demo_console_shows_one_line_per_step_and_a_failing_steps_log_tail():
    console = io.StringIO()
    quiet = demo.StepConsole(console)
    quiet.write("summary of the experiment\n\n[1/3] prepare: skipped (done)\n\n[2/3] train a\n  $ nnUNetv2_train 1 2d 0\n")
    assert console.getvalue() == "[1/3] prepare: skipped (done)\n[2/3] train a … "  # the running step shows at once
    quiet.write("    Epoch 0\n[2/3] train a: finished in 40 s\n\n[3/3] predict b\n  last lines of log:\n  | Traceback\n")
    assert console.getvalue().splitlines() == [
        "[1/3] prepare: skipped (done)", "[2/3] train a … finished in 40 s", "[3/3] predict b … ", "  last lines of log:", "  | Traceback"]


def test_demo_end_to_end_then_upper_bound_and_resume(tmp_path, monkeypatch, capsys):
    """The demo's workflow, smaller (two domains of 3 cases of 3×48×48, 1 epoch × 2 iterations at batch 2): synthetic
    data, the packaged LiteMedSAM, baseline, DeSAM-B and DeSAM-P trained and applied with the real nnU-Net commands, the report and both
    figures. Then the cross-domain command in the demo's folders: --upper-bound refuses a target split left by
    another run until --overwrite-split, then runs only the upper bound's steps; the paper's protocol only
    rescores; rerunning the demo redoes nothing and removes the nnU-Net folders; once they are gone, a rerun says the
    demo has finished instead of training again."""
    folder = tmp_path / "demo"
    demo.run_demo(["-o", str(folder), "--cases", "3", "--keep", "-v"], SMALL_DEMO)
    first = capsys.readouterr().out
    assert "[3/" in first and f"train nnUNetTrainerDeSAM on {SOURCE}" in first and "\n    Epoch 0\n" in first
    assert "Please cite" not in first
    train_log = (folder / "crossdomain" / "logs" / f"train_nnUNetTrainerDeSAM_{SOURCE}.log").read_text()
    assert "Please cite" in train_log and "Epoch 0" in train_log and "train_loss" in train_log
    assert "using the packaged LiteMedSAM encoder" in train_log  # the demo brings no SAM file of its own
    debug = json.loads(next((folder / "nnUNet_results").glob("*/nnUNetTrainerDeSAM__*/fold_0/debug.json")).read_text())
    assert debug["batch_size"] == str(SMALL_DEMO.batch_size)
    output = folder / "crossdomain"
    check_outputs(output, folder / "nnUNet_raw" / TARGET)
    assert demo.DISCLAIMER in (output / "table.md").read_text()

    for variable in crossdomain_experiment.NNUNET_FOLDERS:
        monkeypatch.setenv(variable, str(folder / variable))
    monkeypatch.delenv("DESAM_SAM_CHECKPOINT", raising=False)
    monkeypatch.setenv("DESAM_BATCH_SIZE", str(SMALL_DEMO.batch_size))
    monkeypatch.setenv("DESAM_GRID_SIZE", str(SMALL_DEMO.grid_size))
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    argv = demo.crossdomain_arguments(folder, SMALL_DEMO) + ["--upper-bound"]
    target_split = folder / "nnUNet_preprocessed" / TARGET / "splits_final.json"
    target_split.parent.mkdir(parents=True)
    target_split.write_text(json.dumps([{"train": ["SiteB_000"], "val": ["SiteB_001"]}]))
    assert_one_line_error(capsys, run_main(argv), 2, str(target_split), "--overwrite-split")

    assert run_main(argv + ["--overwrite-split"]) == 0
    second = capsys.readouterr().out
    commands = [line.split("$ ", 1)[1] for line in second.splitlines() if line.startswith("  $ ")]
    assert [next(word for word in command.split() if word.startswith("nnUNetv2_")) for command in commands] == [
        "nnUNetv2_plan_and_preprocess", "nnUNetv2_train", "nnUNetv2_predict", "nnUNetv2_evaluate_folder"]
    assert all("902" in command for command in commands)
    validation = json.loads(target_split.read_text())[0]["val"]
    assert len(json.loads(target_split.read_text())) == 1 and len(validation) == 1
    table = (output / "table.md").read_text()
    assert "| Upper bound | n/a | " in table and "Upper bound: nnUNetTrainerBudget trained on each target" in table
    per_case = json.loads((output / "per_case.json").read_text())["rows"]
    assert {case for row in per_case if row["trainer"] == "Upper bound" for case in row["per_case"]} == set(validation)

    assert run_main(argv + ["--protocol", "foreground-slices"]) == 0
    third = capsys.readouterr().out
    assert "$ nnUNetv2_" not in third and "predict" in third
    assert all(line.endswith("skipped (done)") for line in third.splitlines() if line.startswith("[") and "predict " in line)
    assert PROTOCOL_FOREGROUND_SLICES in (output / "table.md").read_text()
    assert json.loads((output / "per_case.json").read_text())["protocol"] == PROTOCOL_FOREGROUND_SLICES

    demo.run_demo(["-o", str(folder), "--cases", "3"], SMALL_DEMO)  # quiet: one line per step
    fourth = capsys.readouterr().out
    step_lines = [line for line in fourth.splitlines() if line.startswith("[")]
    work = [line for line in step_lines if not line.split("] ", 1)[1].startswith(("write the report", "draw the"))]
    assert "resuming the demo" in fourth and work and all(line.endswith("skipped (done)") for line in work)
    assert all(line.endswith((" s", "skipped (done)")) for line in step_lines)  # redone steps: header and time on one line
    assert len({line.split("]")[0] for line in step_lines}) == len(step_lines) == int(step_lines[0].split("/")[1].split("]")[0])
    assert "$ nnUNetv2_" not in fourth and "Epoch" not in fourth
    assert sorted(path.name for path in folder.iterdir()) == ["crossdomain", "demo.json"]

    demo.run_demo(["-o", str(folder), "--cases", "3"], SMALL_DEMO)  # finished, its nnU-Net folders gone: says so, retrains nothing
    fifth = capsys.readouterr().out
    assert "this demo has finished" in fifth and not any(line.startswith("[") for line in fifth.splitlines())
    assert sorted(path.name for path in folder.iterdir()) == ["crossdomain", "demo.json"]


def check_outputs(output, target_folder):
    methods = ["Baseline", "DeSAM-B", "DeSAM-P"]
    cases = sorted(p.name[:-len(".nii.gz")] for p in (target_folder / "labelsTr").iterdir())
    table = (output / "table.md").read_text()
    assert PROTOCOL_WHOLE_VOLUME in table
    for method in methods:
        assert f"| {method} |" in table
    for trainer, learning_rate in (("nnUNetTrainerBudget", "0.01"), ("nnUNetTrainerDeSAM_Box", "0.001"), ("nnUNetTrainerDeSAM", "0.001")):
        assert f"= {trainer} (1 epochs × 2 iterations, batch 2, lr {learning_rate})" in table  # nnU-Net's; the demo's
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
        assert {row["trainer"] for row in csv.DictReader(file)} == {"2×2 grid", "3×3 grid"}  # 3×3: the demo's main grid

    for key in ("nnUNetTrainerBudget", "nnUNetTrainerDeSAM_Box", "nnUNetTrainerDeSAM", "grid_size_2"):
        folder = output / "predictions" / key / TARGET
        for case in cases:
            labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}.nii.gz")))
            reference = sitk.GetArrayFromImage(sitk.ReadImage(str(target_folder / "labelsTr" / f"{case}.nii.gz")))
            assert labels.shape == reference.shape
            assert set(np.unique(labels)) <= set(LABELS.values())
