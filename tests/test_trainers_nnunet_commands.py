"""The DeSAM trainers driven through the real nnUNetv2_* console commands, on a small generated dataset."""

import json
import os
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

from nnunetv2_desam.networks.sam_checkpoint import load_sam_state_dict, sam_fingerprint
from nnunetv2_desam.experiments.synthetic import DEFAULT_DOMAINS, synthetic_case
from nnunetv2_desam.errors import ConfigurationError
from nnunetv2_desam.trainers.nnUNetTrainerAdvBias import nnUNetTrainerAdvBias
from nnunetv2_desam.trainers.nnUNetTrainerCSDG import nnUNetTrainerCSDG
from nnunetv2_desam.trainers.nnUNetTrainerDeSAM import nnUNetTrainerDeSAM
from nnunetv2_desam.trainers.nnUNetTrainerMaxStyle import IMAGE_DECODER_KEY, nnUNetTrainerMaxStyle
from nnunetv2_desam.trainers.nnUNetTrainerRandConv import nnUNetTrainerRandConv
from tests.commands import run
from tests.nnunet_workspace import SOURCE, SOURCE_NAME, TARGET_NAME, fold_folder, nnunet_folders, trainer_arguments

DESAM_TRAINERS = ["nnUNetTrainerDeSAM", "nnUNetTrainerDeSAM_Box", "nnUNetTrainerDeSAM_PDMMOnly", "nnUNetTrainerDeSAM_NoIoUHead", "nnUNetTrainerDeSAM_NoMEF"]
DG_TRAINERS = ["nnUNetTrainerAdvBias", "nnUNetTrainerRandConv", "nnUNetTrainerMaxStyle", "nnUNetTrainerCSDG"]  # Table 2's methods
ALL_TRAINERS = ["nnUNetTrainerBudget"] + DESAM_TRAINERS + DG_TRAINERS


@pytest.fixture(scope="module")
def trained(workspace):
    root, env = workspace
    logs = {t: run(["nnUNetv2_train", str(SOURCE), "2d", "0", "-tr", t, "-device", "cpu", "--npz"], env).stdout
            for t in ALL_TRAINERS}
    return root, env, logs


@pytest.mark.parametrize("trainer", ALL_TRAINERS)
def test_training_writes_final_checkpoint_and_validation(trained, trainer):
    root, _, logs = trained
    folder = fold_folder(root, trainer)
    assert (folder / "checkpoint_final.pth").is_file() and (folder / "checkpoint_best.pth").is_file()
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"}
    assert "Mean Validation Dice" in logs[trainer]


@pytest.mark.parametrize("trainer", DESAM_TRAINERS)
def test_desam_checkpoints_are_slim_and_record_the_sam_weights(trained, trainer, tiny_sam_checkpoint):
    root, _, logs = trained
    checkpoint = torch.load(fold_folder(root, trainer) / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = checkpoint["network_weights"]
    assert not any(k.startswith(("image_encoder.", "prompt_encoder.")) for k in weights)
    assert any(k.startswith("decoder.") for k in weights)
    assert bytes(weights["sam_fingerprint"].tolist()).hex() == sam_fingerprint(load_sam_state_dict(tiny_sam_checkpoint))
    assert checkpoint["optimizer_state"]["state"] == {} and checkpoint["trainer_name"] == trainer
    assert checkpoint["inference_allowed_mirroring_axes"] is None
    weight_bytes = sum(v.numel() * v.element_size() for v in weights.values())
    sam_bytes = tiny_sam_checkpoint.stat().st_size
    size = (fold_folder(root, trainer) / "checkpoint_final.pth").stat().st_size
    assert size < weight_bytes + 200_000 and size < sam_bytes
    assert "Current learning rate: 0.0001" in logs[trainer]


def test_the_paper_hyperparameters_are_logged(trained):
    root, _, logs = trained
    debug = json.loads((fold_folder(root, "nnUNetTrainerDeSAM") / "debug.json").read_text())
    assert debug["batch_size"] == "8" and debug["initial_lr"] == "0.0001" and debug["weight_decay"] == "0.0"
    assert debug["optimizer"].startswith("Adam")


@pytest.mark.parametrize("trainer", ALL_TRAINERS)
def test_predict_and_evaluate_a_target_domain(trained, trainer):
    root, env, _ = trained
    images, labels = root / "raw" / TARGET_NAME / "imagesTr", root / "raw" / TARGET_NAME / "labelsTr"
    output = root / "predictions" / trainer
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(output), "-d", str(SOURCE), "-c", "2d", "-tr", trainer, "-f", "0", "-device", "cpu"], env)
    predicted = sorted(output.glob("*.nii.gz"))
    assert [p.name for p in predicted] == sorted(p.name for p in labels.glob("*.nii.gz"))
    for prediction in predicted:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction)))
        assert array.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(labels / prediction.name))).shape
        assert set(np.unique(array)) <= {0, 1, 2}
    model = root / "results" / SOURCE_NAME / f"{trainer}__nnUNetPlans__2d"
    run(["nnUNetv2_evaluate_folder", str(labels), str(output), "-djfile", str(model / "dataset.json"), "-pfile", str(model / "plans.json")], env)
    summary = json.loads((output / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 2 and set(summary["mean"]) == {"1", "2"}


def test_find_best_configuration_compares_desam_with_the_baseline_and_its_instructions_run(trained):
    """nnU-Net's model selection over the baseline, DeSAM-P and their ensemble (fold 0, validation saved
    with --npz), then the inference and postprocessing commands it writes, run as printed."""
    root, env, _ = trained
    trainers = ["nnUNetTrainerBudget", "nnUNetTrainerDeSAM"]
    run(["nnUNetv2_find_best_configuration", str(SOURCE), "-c", "2d", "-tr", *trainers, "-f", "0", "-np", "1"], env)
    results = root / "results" / SOURCE_NAME
    information = json.loads((results / "inference_information.json").read_text())
    models = [f"{trainer}__nnUNetPlans__2d" for trainer in trainers]
    assert set(information["all_results"]) == {*models, f"ensemble___{models[0]}___{models[1]}___0"}
    for model in models:  # nnU-Net ranks each model by its own validation's mean foreground Dice
        validation = json.loads((results / model / "fold_0" / "validation" / "summary.json").read_text())
        assert information["all_results"][model] == pytest.approx(validation["foreground_mean"]["Dice"])

    images = root / "raw" / TARGET_NAME / "imagesTr"
    placeholders = {"INPUT_FOLDER": str(images), "OUTPUT_FOLDER_PP": str(root / "best_pp")}
    placeholders.update({f"OUTPUT_FOLDER{suffix}": str(root / f"best{suffix}") for suffix in ("", "_MODEL_1", "_MODEL_2")})
    commands = [line.split() for line in (results / "inference_instructions.txt").read_text().splitlines()
                if line.startswith("nnUNetv2_")]
    assert commands[-1][0] == "nnUNetv2_apply_postprocessing"
    for command in commands:
        command = [placeholders.get(word, word) for word in command]
        run(command + (["-device", "cpu"] if command[0] == "nnUNetv2_predict" else []), env)
    for folder in ("best", "best_pp"):
        predicted = sorted(p.name for p in (root / folder).glob("*.nii.gz"))
        assert predicted == sorted(p.name for p in (root / "raw" / TARGET_NAME / "labelsTr").glob("*.nii.gz"))


def test_predict_with_the_best_checkpoint_saves_probabilities_matching_the_segmentation(trained, tmp_path):
    root, env, _ = trained
    images = root / "raw" / TARGET_NAME / "imagesTr"
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(tmp_path), "-d", str(SOURCE), "-c", "2d", "-tr", "nnUNetTrainerDeSAM",
         "-f", "0", "-chk", "checkpoint_best.pth", "--save_probabilities", "-device", "cpu"], env)
    for case in sorted(images.glob("*_0000.nii.gz")):
        name = case.name.replace("_0000.nii.gz", "")
        probabilities = np.load(tmp_path / f"{name}.npz")["probabilities"]
        segmentation = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{name}.nii.gz")))
        assert probabilities.shape == (3, *segmentation.shape)
        assert np.allclose(probabilities.sum(0), 1, atol=1e-3)
        assert np.array_equal(probabilities.argmax(0), segmentation)


def test_fine_tuning_from_pretrained_weights_starts_from_them_and_refuses_another_sam_file(trained, other_tiny_sam_checkpoint):
    """nnUNetv2_train -pretrained_weights with a slim DeSAM checkpoint (SAM comes from DESAM_SAM_CHECKPOINT)."""
    root, env, _ = trained
    pretrained = fold_folder(root, "nnUNetTrainerDeSAM") / "checkpoint_final.pth"
    command = ["nnUNetv2_train", str(SOURCE), "2d", "all", "-tr", "nnUNetTrainerDeSAM", "-device", "cpu", "-pretrained_weights", str(pretrained)]
    refused = run(command, {**env, "DESAM_SAM_CHECKPOINT": str(other_tiny_sam_checkpoint)}, expect_success=False)
    assert refused.returncode != 0
    assert "were trained with SAM weights of fingerprint" in refused.stderr and "Traceback" not in refused.stderr
    run(command, env)
    start = torch.load(pretrained, map_location="cpu", weights_only=False)["network_weights"]
    tuned = torch.load(pretrained.parent.parent / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert tuned.keys() == start.keys()
    # nnU-Net transfers all but the '.seg_layers.' (output) layers, even for the same classes; two Adam steps at
    # lr 1e-4 move each weight by at most ~2e-4, a fresh initialisation would be far off
    transferred = [k for k in start if ".seg_layers." not in k and start[k].is_floating_point()]
    assert max((tuned[k].float() - start[k].float()).abs().max().item() for k in transferred) < 1e-3


def test_continue_training_after_the_end_reruns_validation_from_the_slim_checkpoint(trained):
    root, env, _ = trained
    result = run(["nnUNetv2_train", str(SOURCE), "2d", "0", "-tr", "nnUNetTrainerDeSAM", "-device", "cpu", "--c"], env)
    assert "Mean Validation Dice" in result.stdout


def test_prediction_with_another_sam_file_is_refused(trained, other_tiny_sam_checkpoint, tmp_path):
    root, env, _ = trained
    env = {**env, "DESAM_SAM_CHECKPOINT": str(other_tiny_sam_checkpoint)}
    images = root / "raw" / TARGET_NAME / "imagesTr"
    result = run(["nnUNetv2_predict", "-i", str(images), "-o", str(tmp_path), "-d", str(SOURCE), "-c", "2d", "-tr", "nnUNetTrainerDeSAM", "-f", "0", "-device", "cpu"], env, expect_success=False)
    assert result.returncode != 0
    assert "nnunetv2-desam: error: these DeSAM weights were trained with SAM weights of fingerprint" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.nii.gz"))


def test_prediction_without_sam_variable_uses_lite_medsam_and_refuses_weights_trained_on_another_sam(trained, tmp_path):
    """Unset, the packaged LiteMedSAM is the SAM in use: weights trained on the tiny SAM are refused in one line that
    names it, and no file is written."""
    root, env, _ = trained
    env = {k: v for k, v in env.items() if k != "DESAM_SAM_CHECKPOINT"}
    images = root / "raw" / TARGET_NAME / "imagesTr"
    result = run(["nnUNetv2_predict", "-i", str(images), "-o", str(tmp_path), "-d", str(SOURCE), "-c", "2d", "-tr", "nnUNetTrainerDeSAM_Box", "-f", "0", "-device", "cpu"], env, expect_success=False)
    assert result.returncode != 0
    assert "DESAM_SAM_CHECKPOINT is unset: using the packaged LiteMedSAM" in result.stdout
    assert "these DeSAM weights were trained with SAM weights of fingerprint" in result.stderr and "the packaged LiteMedSAM" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.nii.gz"))


def test_training_with_a_missing_sam_file_is_refused_before_nnunet_starts(workspace, tmp_path):
    """Checked before nnU-Net's trainer starts: no nnU-Net preamble, no (empty) training log left behind."""
    root, env = workspace
    env = {**env, "DESAM_SAM_CHECKPOINT": str(tmp_path / "sam_vit_h_4b8939.pth")}
    folder = fold_folder(root, "nnUNetTrainerDeSAM")
    logs_before = set(folder.glob("training_log_*.txt")) if folder.is_dir() else set()
    result = run(["nnUNetv2_train", str(SOURCE), "2d", "0", "-tr", "nnUNetTrainerDeSAM", "-device", "cpu"], env, expect_success=False)
    assert result.returncode != 0
    assert "SAM checkpoint not found" in result.stderr and "Traceback" not in result.stderr
    assert "Using device" not in result.stdout and "configuration used by this training" not in result.stdout  # the trainer's preamble
    assert (set(folder.glob("training_log_*.txt")) if folder.is_dir() else set()) == logs_before


def test_3d_configuration_is_refused(workspace):
    root, env = workspace
    result = run(["nnUNetv2_train", str(SOURCE), "3d_fullres", "0", "-tr", "nnUNetTrainerDeSAM", "-device", "cpu"], env, expect_success=False)
    assert result.returncode != 0
    assert "DeSAM is a 2D method, use -c 2d" in result.stderr and "Traceback" not in result.stderr


def test_maxstyle_checkpoint_holds_the_plain_network_and_the_decoder_apart(trained):
    """nnU-Net's predictor loads ``network_weights`` strictly into ``build_network_architecture``'s network."""
    root, _, _ = trained
    checkpoint = torch.load(fold_folder(root, "nnUNetTrainerMaxStyle") / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    trainer = make_dg_trainer(root, nnUNetTrainerMaxStyle, "2d")
    plain = nnUNetTrainerMaxStyle.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3, True)
    plain.load_state_dict(checkpoint["network_weights"], strict=True)
    assert set(checkpoint["network_weights"]) == set(nnUNetTrainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, 3, True).state_dict())
    assert checkpoint[IMAGE_DECODER_KEY] and not set(checkpoint[IMAGE_DECODER_KEY]) & set(checkpoint["network_weights"])


def make_dg_trainer(root: Path, trainer_class, configuration: str):
    """A Table 2 trainer built directly from the workspace's plans, on the CPU; 3d_fullres reads the 2d data folder
    (``initialize`` only looks at its file endings)."""
    plans, dataset_json = trainer_arguments(root)
    plans["configurations"]["3d_fullres"]["data_identifier"] = plans["configurations"]["2d"]["data_identifier"]
    with mock.patch.dict(os.environ, nnunet_folders(root)):
        trainer = trainer_class(plans, configuration, 1, dataset_json, device=torch.device("cpu"))
        trainer.initialize()
    return trainer


def synthetic_batch(trainer, spatial):
    """Random data B×1×spatial with threshold labels at every deep-supervision scale."""
    data = torch.randn(2, 1, *spatial, generator=torch.Generator().manual_seed(0))
    labels = (data > 0.5).float() + (data > 1.5).float()
    target = [labels if all(f == 1 for f in scale) else F.interpolate(labels, scale_factor=scale, mode="nearest")
              for scale in trainer._get_deep_supervision_scales()]
    return {"data": data, "target": target}


@pytest.mark.parametrize("configuration,spatial", [("2d", (48, 48)), ("3d_fullres", (4, 32, 32))])
@pytest.mark.parametrize("trainer_class", [nnUNetTrainerAdvBias, nnUNetTrainerRandConv, nnUNetTrainerMaxStyle, nnUNetTrainerCSDG])
def test_dg_train_step_trains_on_2d_and_3d_batches_with_the_labels_untouched(workspace, trainer_class, configuration, spatial):
    root, _ = workspace
    trainer = make_dg_trainer(root, trainer_class, configuration)
    batch = synthetic_batch(trainer, spatial)
    seen_targets, loss = [], trainer.loss
    trainer.loss = lambda output, target: seen_targets.append(target) or loss(output, target)
    modules = [trainer.network] + ([trainer.image_decoder] if trainer_class is nnUNetTrainerMaxStyle else [])
    before = [[p.detach().clone() for p in m.parameters()] for m in modules]
    result = trainer.train_step(batch)
    assert np.isfinite(result["loss"]) and seen_targets
    assert all(len(t) == len(batch["target"]) and all(a is b for a, b in zip(t, batch["target"])) for t in seen_targets)
    for module, old in zip(modules, before):
        assert any(not torch.equal(p, q) for p, q in zip(module.parameters(), old))


def test_maxstyle_resumes_with_its_image_decoder(workspace, tmp_path):
    root, _ = workspace
    trainer = make_dg_trainer(root, nnUNetTrainerMaxStyle, "2d")
    trainer.train_step(synthetic_batch(trainer, (48, 48)))
    trainer.save_checkpoint(str(tmp_path / "checkpoint.pth"))
    resumed = make_dg_trainer(root, nnUNetTrainerMaxStyle, "2d")
    resumed.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    for name, value in trainer.image_decoder.state_dict().items():
        assert torch.equal(resumed.image_decoder.state_dict()[name], value)


def make_trainer(root: Path, labels: dict, **extra):
    """nnUNetTrainerDeSAM built directly from the workspace's plans with other dataset labels."""
    plans, dataset_json = trainer_arguments(root)
    dataset_json = {**dataset_json, "labels": labels, **extra}
    with mock.patch.dict(os.environ, nnunet_folders(root)):
        return nnUNetTrainerDeSAM(plans, "2d", 0, dataset_json, device=torch.device("cpu"))


def test_region_based_datasets_are_refused(workspace):
    root, _ = workspace
    with pytest.raises(ConfigurationError, match="region-based datasets are not supported"):
        make_trainer(root, {"background": 0, "both": [1, 2], "organ_b": 2}, regions_class_order=[1, 2])


def test_predict_honours_the_grid_size_variable(trained, tmp_path):
    """DESAM_GRID_SIZE is read when nnUNetv2_predict builds the network: the same model and case give the same
    probabilities with the same grid and other ones with another grid."""
    root, env, _ = trained
    images = tmp_path / "images"
    images.mkdir()
    case = sorted((root / "raw" / TARGET_NAME / "imagesTr").glob("*_0000.nii.gz"))[0]
    shutil.copy(case, images / case.name)
    probabilities = {}
    for run_name, grid in (("first", "1"), ("again", "1"), ("other grid", "4")):
        output = tmp_path / run_name.replace(" ", "_")
        run(["nnUNetv2_predict", "-i", str(images), "-o", str(output), "-d", str(SOURCE), "-c", "2d", "-tr", "nnUNetTrainerDeSAM",
             "-f", "0", "--save_probabilities", "-device", "cpu"], {**env, "DESAM_GRID_SIZE": grid})
        (npz,) = output.glob("*.npz")
        probabilities[run_name] = np.load(npz)["probabilities"]
    assert np.array_equal(probabilities["first"], probabilities["again"])
    assert np.abs(probabilities["first"] - probabilities["other grid"]).max() > 1e-3


TWO_CHANNELS = 953
TWO_CHANNELS_NAME = f"Dataset{TWO_CHANNELS}_TwoChannelsIgnore"


def write_two_channel_dataset(raw: Path, num_cases: int = 5) -> Path:
    """Channels 0 and 1: the same anatomy as rendered by sites A and B. One organ (label 1) and the synthetic
    data's second organ as nnU-Net's ignore label (2): one foreground class, where the source dataset has two."""
    folder = raw / TWO_CHANNELS_NAME
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    for index in range(num_cases):
        (first, labels), (second, _) = (synthetic_case(d, np.random.default_rng(index), (4, 48, 48)) for d in DEFAULT_DOMAINS[:2])
        for array, name in ((first, f"imagesTr/case{index}_0000"), (second, f"imagesTr/case{index}_0001"), (labels, f"labelsTr/case{index}")):
            volume = sitk.GetImageFromArray(array)
            volume.SetSpacing((1.0, 1.0, 3.0))
            sitk.WriteImage(volume, str(folder / f"{name}.nii.gz"))
    generate_dataset_json(str(folder), {0: "T2", 1: "ADC"}, {"background": 0, "organ": 1, "ignore": 2}, num_cases, ".nii.gz",
                          dataset_name=folder.name)
    return folder


@pytest.fixture(scope="module")
def fine_tuned_two_channels(trained):
    """The two-channel dataset with an ignore label through nnUNetv2_plan_and_preprocess and nnUNetv2_train
    (fold 0), fine-tuned from the source's 2-class DeSAM checkpoint (-pretrained_weights) at DESAM_BATCH_SIZE=2."""
    root, env, _ = trained
    write_two_channel_dataset(root / "raw")
    run(["nnUNetv2_plan_and_preprocess", "-d", str(TWO_CHANNELS), "-c", "2d", "-np", "1"], {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"})
    pretrained = fold_folder(root, "nnUNetTrainerDeSAM") / "checkpoint_final.pth"
    env = {**env, "DESAM_BATCH_SIZE": "2"}
    log = run(["nnUNetv2_train", str(TWO_CHANNELS), "2d", "0", "-tr", "nnUNetTrainerDeSAM", "-device", "cpu",
               "-pretrained_weights", str(pretrained)], env).stdout
    return root, env, log, pretrained


def test_fine_tuning_on_a_dataset_with_another_number_of_classes(fine_tuned_two_channels):
    """nnU-Net transfers every weight but the '.seg_layers.' ones, which depend on the class count: PDMM's two
    heads and the output layer of PRIM's IoU head; those start afresh with the new dataset's classes."""
    root, _, log, pretrained = fine_tuned_two_channels
    start = torch.load(pretrained, map_location="cpu", weights_only=False)["network_weights"]
    folder = fold_folder(root, "nnUNetTrainerDeSAM", TWO_CHANNELS_NAME)
    tuned = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert "Loading pretrained weights from file" in log
    assert tuned.keys() == start.keys()
    class_dependent = {k for k in start if ".seg_layers." in k}
    assert class_dependent == {f"{layer}.{p}" for p in ("weight", "bias")
                               for layer in ("decoder.seg_layers.0", "decoder.seg_layers.1", "prim.iou_prediction_head.seg_layers.0")}
    assert [tuned[k].shape[0] for k in sorted(class_dependent) if k.endswith("weight")] == [2, 2, 1]
    assert [start[k].shape[0] for k in sorted(class_dependent) if k.endswith("weight")] == [3, 3, 2]
    # two Adam steps at lr 1e-4 move each weight by at most ~2e-4; a fresh initialisation would be far off
    transferred = [k for k in start if k not in class_dependent and start[k].is_floating_point()]
    assert max((tuned[k].float() - start[k].float()).abs().max().item() for k in transferred) < 1e-3


def test_a_two_channel_dataset_is_trained_and_predicted_with_both_channels(fine_tuned_two_channels, tmp_path):
    """nnUNetv2_predict on a case and on the same case with its second channel flattened: both channels reach the
    network, so the probabilities differ. Grid prompts averaged (``mean``): after two training steps no prompt's
    predicted IoU passes the default gate, which would make both predictions all background."""
    root, env, _, _ = fine_tuned_two_channels
    images = tmp_path / "images"
    images.mkdir()
    raw_images = root / "raw" / TWO_CHANNELS_NAME / "imagesTr"
    for channel in ("0000", "0001"):
        shutil.copy(raw_images / f"case0_{channel}.nii.gz", images / f"case0_{channel}.nii.gz")
    shutil.copy(raw_images / "case0_0000.nii.gz", images / "flat_0000.nii.gz")
    second = sitk.ReadImage(str(raw_images / "case0_0001.nii.gz"))
    flat = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(second)))
    flat.CopyInformation(second)
    sitk.WriteImage(flat, str(images / "flat_0001.nii.gz"))
    output = tmp_path / "predictions"
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(output), "-d", str(TWO_CHANNELS), "-c", "2d", "-tr", "nnUNetTrainerDeSAM",
         "-f", "0", "--save_probabilities", "-device", "cpu"], {**env, "DESAM_GRID_AGGREGATION": "mean"})
    probabilities = {name: np.load(output / f"{name}.npz")["probabilities"] for name in ("case0", "flat")}
    assert probabilities["case0"].shape == probabilities["flat"].shape == (2, 4, 48, 48)
    assert np.abs(probabilities["case0"] - probabilities["flat"]).max() > 1e-3
    segmentation = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "case0.nii.gz")))
    assert segmentation.shape == (4, 48, 48) and set(np.unique(segmentation)) <= {0, 1}


def test_training_with_an_ignore_label_through_nnunet(fine_tuned_two_channels):
    """Labels 2 (ignore) stay out of the loss (nnU-Net's CE would fail on a label beyond the two outputs),
    of the training prompts and of the validation, which scores class 1 only."""
    root, _, log, _ = fine_tuned_two_channels
    folder = fold_folder(root, "nnUNetTrainerDeSAM", TWO_CHANNELS_NAME)
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1"} and "Mean Validation Dice" in log


def test_the_batch_size_variable_sets_the_batch_size_nnunet_trains_with(fine_tuned_two_channels):
    root, _, _, _ = fine_tuned_two_channels
    debug = json.loads((fold_folder(root, "nnUNetTrainerDeSAM", TWO_CHANNELS_NAME) / "debug.json").read_text())
    assert debug["batch_size"] == "2"  # 8 (the paper's) without DESAM_BATCH_SIZE: test_the_paper_hyperparameters_are_logged
