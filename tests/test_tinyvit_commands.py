"""nnUNetv2_train → nnUNetv2_predict → nnUNetv2_evaluate_folder on a generated MobileSAM file (the packaged LiteMedSAM,
with no SAM variable set, goes through the same commands on real CT and MR cases in test_real_abdominal.py)."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_desam.experiments.random_sam_checkpoint import write_random_mobile_sam_checkpoint
from nnunetv2_desam.networks.frozen_sam_weights import FINGERPRINT_KEY
from nnunetv2_desam.networks.sam_checkpoint import load_sam_state_dict, sam_fingerprint
from tests.commands import run
from tests.nnunet_workspace import SOURCE, SOURCE_NAME, TARGET_NAME, fold_folder, make_workspace

BUDGET = {"DESAM_BATCH_SIZE": "2", "DESAM_GRID_SIZE": "2"}
NOTICE = "DESAM_SAM_CHECKPOINT is unset: using the packaged LiteMedSAM"


@pytest.fixture(scope="module")
def tinyvit_workspace(tmp_path_factory, tiny_sam_checkpoint):
    """The shared synthetic workspace (its DESAM_SAM_CHECKPOINT is set per test)."""
    root = tmp_path_factory.mktemp("tinyvit_workspace")
    env = make_workspace(root, tiny_sam_checkpoint)
    del env["DESAM_SAM_CHECKPOINT"]
    return root, {**env, **BUDGET}


def train_predict_evaluate(root, env, trainer, output):
    """Train fold 0, predict the target domain, evaluate; (training stdout, prediction stdout, summary)."""
    training = run(["nnUNetv2_train", str(SOURCE), "2d", "0", "-tr", trainer, "-device", "cpu"], env)
    images, labels = root / "raw" / TARGET_NAME / "imagesTr", root / "raw" / TARGET_NAME / "labelsTr"
    prediction = run(["nnUNetv2_predict", "-i", str(images), "-o", str(output), "-d", str(SOURCE), "-c", "2d", "-tr", trainer,
                      "-f", "0", "-device", "cpu"], env)
    model = root / "results" / SOURCE_NAME / f"{trainer}__nnUNetPlans__2d"
    run(["nnUNetv2_evaluate_folder", str(labels), str(output), "-djfile", str(model / "dataset.json"), "-pfile", str(model / "plans.json")], env)
    for predicted in output.glob("*.nii.gz"):
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(predicted))))) <= {0, 1, 2}
    return training.stdout, prediction.stdout, json.loads((output / "summary.json").read_text())


def test_desam_box_trains_and_predicts_on_a_mobile_sam_file(tinyvit_workspace, tmp_path):
    root, env = tinyvit_workspace
    path = tmp_path / "mobile_sam.pt"
    write_random_mobile_sam_checkpoint(str(path), seed=4)
    env = {**env, "DESAM_SAM_CHECKPOINT": str(path)}
    training, _, summary = train_predict_evaluate(root, env, "nnUNetTrainerDeSAM_Box", tmp_path / "mobile_sam")
    assert NOTICE not in training
    assert len(summary["metric_per_case"]) == 2
    checkpoint = torch.load(fold_folder(root, "nnUNetTrainerDeSAM_Box") / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert bytes(checkpoint["network_weights"][FINGERPRINT_KEY].tolist()).hex() == sam_fingerprint(load_sam_state_dict(str(path)))
