"""MedSAM and SAMed through the real nnUNetv2_* commands and nnU-Net's own train_step, on the commands tests' dataset."""

import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_desam.networks.frozen_sam_weights import FINGERPRINT_KEY
from nnunetv2_desam.networks.sam_checkpoint import load_sam_state_dict, sam_fingerprint
from nnunetv2_desam.trainers.nnUNetTrainerMedSAM import SAM_ARCHITECTURE_KEY, nnUNetTrainerMedSAM
from nnunetv2_desam.trainers.nnUNetTrainerSAMed import nnUNetTrainerSAMed
from tests.commands import run
from tests.nnunet_workspace import SOURCE, SOURCE_NAME, TARGET_NAME, fold_folder, nnunet_folders, trainer_arguments

TRAINERS = {"nnUNetTrainerSAMed": nnUNetTrainerSAMed, "nnUNetTrainerMedSAM": nnUNetTrainerMedSAM}


@pytest.fixture(scope="module")
def trained(workspace):
    root, env = workspace
    logs = {t: run(["nnUNetv2_train", str(SOURCE), "2d", "0", "-tr", t, "-device", "cpu"], env).stdout for t in TRAINERS}
    return root, env, logs


def predict(root: Path, env: dict, trainer: str, output: Path, expect_success=True):
    images = root / "raw" / TARGET_NAME / "imagesTr"
    command = ["nnUNetv2_predict", "-i", str(images), "-o", str(output), "-d", str(SOURCE), "-c", "2d", "-tr", trainer, "-f", "0", "-device", "cpu"]
    return run(command, env, expect_success)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_training_logs_the_authors_settings_and_validates(trained, trainer):
    root, _, logs = trained
    folder = fold_folder(root, trainer)
    assert set(json.loads((folder / "validation" / "summary.json").read_text())["mean"]) == {"1", "2"}
    debug = json.loads((folder / "debug.json").read_text())
    assert debug["optimizer"].startswith("AdamW") and debug["batch_size"] == "8"
    if trainer == "nnUNetTrainerSAMed":  # warm-up: iteration 0 runs at 0.005 / 250
        assert debug["initial_lr"] == "0.005" and debug["weight_decay"] == "0.1"
        assert "Current learning rate: 2e-05" in logs[trainer]
    else:
        assert debug["initial_lr"] == "0.0001" and debug["weight_decay"] == "0.01"
        assert "Current learning rate: 0.0001" in logs[trainer]


def test_samed_checkpoint_holds_lora_decoder_and_fingerprint_only(trained, tiny_sam_checkpoint):
    root, _, _ = trained
    path = fold_folder(root, "nnUNetTrainerSAMed") / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    keys = set(checkpoint["network_weights"])
    encoder = {k for k in keys if k.startswith("image_encoder.")}
    assert encoder and all(".attn.qkv.lora_" in k for k in encoder)
    assert keys - encoder - {FINGERPRINT_KEY} == {k for k in keys if k.startswith("mask_decoder.")} | {"prompt_encoder.no_mask_embed.weight"}
    fingerprint = bytes(checkpoint["network_weights"][FINGERPRINT_KEY].tolist()).hex()
    assert fingerprint == sam_fingerprint(load_sam_state_dict(tiny_sam_checkpoint))
    assert checkpoint["optimizer_state"]["state"] == {} and checkpoint["inference_allowed_mirroring_axes"] is None
    assert path.stat().st_size < tiny_sam_checkpoint.stat().st_size / 2


def test_medsam_checkpoint_holds_every_weight_in_half_precision_and_the_model_folder_records_the_geometry(trained, tiny_sam_checkpoint):
    root, _, _ = trained
    checkpoint = torch.load(fold_folder(root, "nnUNetTrainerMedSAM") / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = checkpoint["network_weights"]
    assert {k for k in weights if not k.startswith("class_prompts.")} == set(load_sam_state_dict(tiny_sam_checkpoint))
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert checkpoint["optimizer_state"]["state"] == {}
    best = torch.load(fold_folder(root, "nnUNetTrainerMedSAM") / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    assert best["network_weights"]["image_encoder.pos_embed"].dtype == torch.float32 and best["optimizer_state"]["state"]
    plans = json.loads((fold_folder(root, "nnUNetTrainerMedSAM").parent / "plans.json").read_text())
    assert plans["configurations"]["2d"][SAM_ARCHITECTURE_KEY]["encoder_embed_dim"] == 32


@pytest.mark.parametrize("trainer", TRAINERS)
def test_predict_and_evaluate_a_target_domain(trained, trainer):
    """MedSAM predicts without any SAM file (its checkpoint carries the encoder); SAMed rebuilds from the SAM file."""
    root, env, _ = trained
    if trainer == "nnUNetTrainerMedSAM":
        env = {k: v for k, v in env.items() if k != "DESAM_SAM_CHECKPOINT"}
    output = root / "predictions" / trainer
    predict(root, env, trainer, output)
    labels = root / "raw" / TARGET_NAME / "labelsTr"
    predicted = sorted(output.glob("*.nii.gz"))
    assert [p.name for p in predicted] == sorted(p.name for p in labels.glob("*.nii.gz"))
    for prediction in predicted:
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(prediction))))) <= {0, 1, 2}
    model = root / "results" / SOURCE_NAME / f"{trainer}__nnUNetPlans__2d"
    run(["nnUNetv2_evaluate_folder", str(labels), str(output), "-djfile", str(model / "dataset.json"), "-pfile", str(model / "plans.json")], env)
    assert len(json.loads((output / "summary.json").read_text())["metric_per_case"]) == 2


def test_samed_prediction_refuses_another_sam_file_and_the_default_tinyvit(trained, other_tiny_sam_checkpoint, tmp_path):
    root, env, _ = trained
    refused = predict(root, {**env, "DESAM_SAM_CHECKPOINT": str(other_tiny_sam_checkpoint)}, "nnUNetTrainerSAMed", tmp_path / "other", False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "these SAMed weights were trained with SAM weights of fingerprint" in refused.stderr
    missing = predict(root, {k: v for k, v in env.items() if k != "DESAM_SAM_CHECKPOINT"}, "nnUNetTrainerSAMed", tmp_path / "none", False)
    # unset: the packaged LiteMedSAM, a TinyViT, on which SAMed's LoRA is not defined
    assert missing.returncode != 0 and "SAMed needs a ViT SAM file" in missing.stderr and "Traceback" not in missing.stderr
    assert not list(tmp_path.rglob("*.nii.gz"))


@pytest.mark.parametrize("trainer", TRAINERS)
def test_3d_and_a_missing_sam_file_are_refused_in_training(workspace, trainer, tmp_path):
    root, env = workspace
    command = ["nnUNetv2_train", str(SOURCE), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"]
    result = run(command, env, expect_success=False)
    method = TRAINERS[trainer].method
    assert result.returncode != 0 and f"{method} is a 2D method, use -c 2d" in result.stderr and "Traceback" not in result.stderr
    command = ["nnUNetv2_train", str(SOURCE), "2d", "0", "-tr", trainer, "-device", "cpu"]
    result = run(command, {**env, "DESAM_SAM_CHECKPOINT": str(tmp_path / "sam_vit_b_01ec64.pth")}, expect_success=False)
    assert result.returncode != 0 and "SAM checkpoint not found" in result.stderr and "Traceback" not in result.stderr


def make_trainer(root: Path, env: dict, trainer: str):
    """The trainer as nnUNetv2_train builds it, initialised (network, optimizer, loss) from the workspace's plans."""
    plans, dataset_json = trainer_arguments(root)
    variables = {**nnunet_folders(root), "DESAM_SAM_CHECKPOINT": env["DESAM_SAM_CHECKPOINT"], "nnUNet_compile": "f"}
    with mock.patch.dict(os.environ, variables):
        instance = TRAINERS[trainer](plans, "2d", 0, dataset_json, device=torch.device("cpu"))
        instance.initialize()
    return instance


@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_real_train_step_moves_every_trainable_parameter_and_no_frozen_one(workspace, trainer):
    root, env = workspace
    instance = make_trainer(root, env, trainer)
    instance.lr_scheduler.step(0)
    network = instance.network
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    batch = {"data": torch.randn(2, 1, 48, 48, generator=generator), "target": torch.randint(0, 3, (2, 1, 48, 48), generator=generator).float()}
    loss = instance.train_step(batch)["loss"]
    assert np.isfinite(loss)
    moved = {name for name, p in network.named_parameters() if not torch.equal(p, before[name])}
    trainable = {name for name, p in network.named_parameters() if p.requires_grad}
    assert moved == trainable
    assert sum(p.numel() for n, p in network.named_parameters() if n in moved) < sum(p.numel() for p in network.parameters())
    assert {id(p) for group in instance.optimizer.param_groups for p in group["params"]} == {id(p) for p in network.parameters() if p.requires_grad}
