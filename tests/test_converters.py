"""Dataset converters: layouts, label mappings, geometry, idempotence, refusals and bad input.

Most tests build tiny synthetic releases (4x8x8 volumes); the real-data tests convert the case
subsets in ``../shared/data`` and skip where that folder is absent.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_desam.experiments import convert_abdominal, convert_prostate
from nnunetv2_desam.experiments.raw_dataset import MANIFEST_FILE, ConversionError, LabelMapping

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAPE = (4, 8, 8)
SPACING = (0.6, 0.6, 3.0)
ORIGIN = (-10.0, 20.0, 5.0)
DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture(autouse=True)
def nnunet_env(tmp_path, monkeypatch):
    """Point nnU-Net's folders into tmp_path, so no test sees (or writes) real datasets."""
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    return tmp_path / "nnUNet_raw"


def write_nifti(path, array, spacing=SPACING, origin=ORIGIN, direction=DIRECTION):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def random_image(seed):
    return np.random.default_rng(seed).normal(100, 20, SHAPE).astype(np.float32)


def blob_label(foreground=1, dtype=np.uint8):
    label = np.zeros(SHAPE, dtype=dtype)
    label[1:3, 2:6, 3:7] = foreground
    return label


def read_array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def run_main(main, argv, capsys):
    """Run a converter's main(); return (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(folder):
    """Every file under ``folder`` with its modification time, to prove nothing was rewritten."""
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def assert_nothing_written(raw):
    assert not raw.exists() or not any(raw.iterdir()), f"left behind: {list(raw.iterdir())}"


# ---------------------------------------------------------------------------------------------
# prostate

@pytest.fixture
def prostate_root(tmp_path):
    """Four sites, each with another label spelling, file ending and foreground encoding."""
    root = tmp_path / "prostate"
    write_nifti(root / "RUNMC" / "Case00.nii.gz", random_image(0))
    write_nifti(root / "RUNMC" / "Case00_segmentation.nii.gz", blob_label(1))
    write_nifti(root / "RUNMC" / "Case01.nii.gz", random_image(1))
    write_nifti(root / "RUNMC" / "Case01_segmentation.nii.gz", blob_label(1))
    write_nifti(root / "bmc" / "Case00.nii.gz", random_image(2))
    write_nifti(root / "bmc" / "Case00_Segmentation.nii", blob_label(255))
    write_nifti(root / "I2CVB" / "Case03.nii.gz", random_image(3))
    write_nifti(root / "I2CVB" / "Case03_SEGMENTATION.nii.gz", blob_label(2.0, np.float32))
    write_nifti(root / "HK" / "Case02.nii", random_image(4))
    write_nifti(root / "HK" / "Case02_segmentation.nii.gz", blob_label(1))
    (root / "HK" / "readme.txt").write_text("not a case")
    return root


def test_prostate_converts_every_site_naming_variant(prostate_root, nnunet_env, capsys):
    code, out, err = run_main(convert_prostate.main, ["-i", prostate_root, "-d", 201], capsys)
    assert code == 0, err
    assert sorted(p.name for p in nnunet_env.iterdir()) == [
        "Dataset201_ProstateRUNMC", "Dataset202_ProstateBMC", "Dataset203_ProstateI2CVB", "Dataset206_ProstateHK"]
    assert "[2/2] RUNMC/Case01.nii.gz -> RUNMC_Case01" in out
    assert out.strip().splitlines()[-1].startswith("Done: 4 dataset(s)")
    expected = {"Dataset201_ProstateRUNMC": ["RUNMC_Case00", "RUNMC_Case01"], "Dataset202_ProstateBMC": ["BMC_Case00"],
                "Dataset203_ProstateI2CVB": ["I2CVB_Case03"], "Dataset206_ProstateHK": ["HK_Case02"]}
    for dataset, cases in expected.items():
        folder = nnunet_env / dataset
        dataset_json = json.loads((folder / "dataset.json").read_text())
        assert dataset_json["channel_names"] == {"0": "T2"}
        assert dataset_json["labels"] == {"background": 0, "prostate": 1}
        assert dataset_json["numTraining"] == len(cases)
        assert dataset_json["file_ending"] == ".nii.gz"
        assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in cases]
        for case in cases:
            label = sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz"))
            assert label.GetPixelID() == sitk.sitkUInt8
            np.testing.assert_array_equal(sitk.GetArrayFromImage(label), blob_label(1))


def test_prostate_keeps_image_voxels_and_geometry(prostate_root, nnunet_env, capsys):
    run_main(convert_prostate.main, ["-i", prostate_root, "-d", 201, "--sites", "hk"], capsys)
    image = sitk.ReadImage(str(nnunet_env / "Dataset206_ProstateHK" / "imagesTr" / "HK_Case02_0000.nii.gz"))
    label = sitk.ReadImage(str(nnunet_env / "Dataset206_ProstateHK" / "labelsTr" / "HK_Case02.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), random_image(4))
    for converted in (image, label):
        np.testing.assert_allclose(converted.GetSpacing(), SPACING)
        np.testing.assert_allclose(converted.GetOrigin(), ORIGIN)
        np.testing.assert_allclose(converted.GetDirection(), DIRECTION)


def test_prostate_sites_option_restricts_and_keeps_fixed_ids(prostate_root, nnunet_env, capsys):
    code, _, err = run_main(convert_prostate.main, ["-i", prostate_root, "-d", 301, "--sites", "bmc", "HK"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in nnunet_env.iterdir()) == ["Dataset302_ProstateBMC", "Dataset306_ProstateHK"]
    assert convert_prostate.prostate_dataset_name("HK", 301) == "Dataset306_ProstateHK"


def test_prostate_requested_site_missing(prostate_root, nnunet_env, capsys):
    code, _, err = run_main(convert_prostate.main, ["-i", prostate_root, "-d", 201, "--sites", "UCL"], capsys)
    assert code == 2 and "no folder for site(s) UCL" in err
    assert_nothing_written(nnunet_env)


@pytest.mark.parametrize("values", [(0, 1, 2), (0, 0.5, 1), (1,), (0, -1)])
def test_prostate_binary_label_refuses_other_value_sets(values):
    with pytest.raises(ConversionError, match="unknown label values"):
        convert_prostate.BinaryLabel()(np.array(values, dtype=np.float32))


def test_prostate_binary_label_accepts_empty_foreground():
    np.testing.assert_array_equal(convert_prostate.BinaryLabel()(np.zeros(SHAPE)), np.zeros(SHAPE, np.uint8))


# ---------------------------------------------------------------------------------------------
# abdominal

def abdominal_root(tmp_path, ct_cases=(0, 5), mr_cases=(1,)):
    """A tiny release; every CT label holds all 14 BTCV values, every MR label all 5 CHAOS values."""
    root = tmp_path / "abdominal"
    for modality, cases, num_values in (("SABS/sabs_CT_normalized", ct_cases, 14),
                                        ("CHAOST2/chaos_MR_T2_normalized", mr_cases, 5)):
        for k in cases:
            write_nifti(root / modality / f"image_{k}.nii.gz", random_image(k))
            write_nifti(root / modality / f"label_{k}.nii.gz", all_values_label(num_values))
    return root


def all_values_label(num_values):
    return (np.arange(np.prod(SHAPE)) % num_values).reshape(SHAPE).astype(np.uint8)


def test_abdominal_maps_labels_exactly(tmp_path, nnunet_env, capsys):
    code, out, err = run_main(convert_abdominal.main, ["-i", abdominal_root(tmp_path), "-d", 210], capsys)
    assert code == 0, err
    assert "[2/2] image_5 -> CT_005" in out and "[1/1] image_1 -> MR_001" in out
    ct = read_array(nnunet_env / "Dataset210_AbdomenCT" / "labelsTr" / "CT_005.nii.gz")
    mr = read_array(nnunet_env / "Dataset211_AbdomenMR" / "labelsTr" / "MR_001.nii.gz")
    btcv_to_ours = np.array([0, 4, 2, 3, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(ct, btcv_to_ours[all_values_label(14)])
    np.testing.assert_array_equal(mr, all_values_label(5))
    labels = {"background": 0, "liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
    for dataset, channel in (("Dataset210_AbdomenCT", "CTnorm"), ("Dataset211_AbdomenMR", "MRI")):
        dataset_json = json.loads((nnunet_env / dataset / "dataset.json").read_text())
        assert dataset_json["labels"] == labels and dataset_json["channel_names"] == {"0": channel}


def test_abdominal_explicit_ids_and_single_modality(tmp_path, nnunet_env, capsys):
    root = abdominal_root(tmp_path)
    code, _, err = run_main(convert_abdominal.main, ["-i", root, "--mr-id", 42, "--modalities", "mr"], capsys)
    assert code == 0, err
    assert [p.name for p in nnunet_env.iterdir()] == ["Dataset042_AbdomenMR"]
    code, _, err = run_main(convert_abdominal.main, ["-i", root, "--modalities", "ct"], capsys)
    assert code == 2 and "no dataset id for ct" in err


def test_abdominal_unknown_label_value_names_case(tmp_path, nnunet_env, capsys):
    root = abdominal_root(tmp_path)
    write_nifti(root / "SABS/sabs_CT_normalized/label_5.nii.gz", blob_label(14))
    code, out, err = run_main(convert_abdominal.main, ["-i", root, "-d", 210], capsys)
    assert code == 2
    assert err.strip() == ("nnUNetv2_desam_convert_abdominal: error: CT_005 (image_5): unknown label values "
                           "[14]; expected a subset of [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]")
    assert "[1/2] image_0 -> CT_000" in out, "the failing case comes after a written one"
    assert_nothing_written(nnunet_env)


def test_label_mapping_accepts_integral_floats():
    mapping = LabelMapping({0: 0, 1: 4, 6: 1})
    np.testing.assert_array_equal(mapping(np.array([0.0, 6.0, 1.0])), [0, 1, 4])


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the case, exit status 2, no traceback, nothing left in nnUNet_raw

def _missing_label(root):
    (root / "RUNMC" / "Case01_segmentation.nii.gz").unlink()


def _label_without_image(root):
    (root / "RUNMC" / "Case01.nii.gz").unlink()


def _size_mismatch(root):
    write_nifti(root / "RUNMC" / "Case01_segmentation.nii.gz", np.zeros((4, 8, 9), np.uint8))


def _spacing_mismatch(root):
    write_nifti(root / "RUNMC" / "Case01_segmentation.nii.gz", blob_label(), spacing=(0.6, 0.6, 3.1))


def _origin_mismatch(root):
    write_nifti(root / "RUNMC" / "Case01_segmentation.nii.gz", blob_label(), origin=(-10.0, 20.0, 6.0))


def _direction_mismatch(root):
    write_nifti(root / "RUNMC" / "Case01_segmentation.nii.gz", blob_label(), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


def _three_label_values(root):
    label = blob_label(1)
    label[0, 0, 0] = 2
    write_nifti(root / "RUNMC" / "Case01_segmentation.nii.gz", label)


def _unreadable_image(root):
    (root / "RUNMC" / "Case01.nii.gz").write_bytes(b"this is not a NIfTI file")


def _truncated_gzip_image(root):
    path = root / "RUNMC" / "Case01.nii.gz"
    path.write_bytes(path.read_bytes()[:-100])


def _truncated_label(root):
    path = write_nifti(root / "RUNMC" / "Case01_segmentation.nii", blob_label())
    (root / "RUNMC" / "Case01_segmentation.nii.gz").unlink()
    path.write_bytes(path.read_bytes()[:-10])


def _empty_site(root):
    for path in (root / "RUNMC").iterdir():
        path.unlink()


def _no_sites(root):
    shutil.rmtree(root / "RUNMC")


@pytest.mark.parametrize("break_input, message", [
    (_missing_label, "RUNMC_Case01 (RUNMC/Case01.nii.gz): missing label"),
    (_label_without_image, "RUNMC_Case01 (RUNMC/Case01_segmentation.nii.gz): label without image"),
    (_size_mismatch, "RUNMC_Case01 (RUNMC/Case01.nii.gz): image/label geometry mismatch: size"),
    (_spacing_mismatch, "RUNMC_Case01 (RUNMC/Case01.nii.gz): image/label geometry mismatch: spacing"),
    (_origin_mismatch, "RUNMC_Case01 (RUNMC/Case01.nii.gz): image/label geometry mismatch: origin"),
    (_direction_mismatch, "RUNMC_Case01 (RUNMC/Case01.nii.gz): image/label geometry mismatch: direction"),
    (_three_label_values, "RUNMC_Case01 (RUNMC/Case01.nii.gz): unknown label values [0, 1, 2]"),
    (_unreadable_image, "RUNMC_Case01 (RUNMC/Case01.nii.gz): cannot read"),
    (_truncated_gzip_image, "RUNMC_Case01 (RUNMC/Case01.nii.gz): cannot read"),
    (_truncated_label, "Case01_segmentation.nii: truncated (598 of 608 bytes)"),
    (_empty_site, "holds no NIfTI files"),
    (_no_sites, "no site folders"),
])
def test_bad_input_is_one_clear_line(tmp_path, nnunet_env, capsys, break_input, message):
    root = tmp_path / "prostate"
    for k in (0, 1):
        write_nifti(root / "RUNMC" / f"Case0{k}.nii.gz", random_image(k))
        write_nifti(root / "RUNMC" / f"Case0{k}_segmentation.nii.gz", blob_label())
    break_input(root)
    code, _, err = run_main(convert_prostate.main, ["-i", root, "-d", 201], capsys)
    assert code == 2
    assert err.startswith("nnUNetv2_desam_convert_prostate: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert_nothing_written(nnunet_env)


def test_missing_modality_folder(tmp_path, nnunet_env, capsys):
    root = abdominal_root(tmp_path)
    shutil.rmtree(root / "CHAOST2")
    code, _, err = run_main(convert_abdominal.main, ["-i", root, "-d", 210], capsys)
    assert code == 2 and "no MR folder" in err and "--modalities" in err
    assert_nothing_written(nnunet_env)


def test_no_output_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw")
    code, _, err = run_main(convert_abdominal.main, ["-i", abdominal_root(tmp_path), "-d", 210], capsys)
    assert code == 2 and "pass --raw or set the nnUNet_raw environment variable" in err


def test_raw_option_overrides_environment(tmp_path, nnunet_env, capsys):
    code, _, err = run_main(convert_abdominal.main,
                            ["-i", abdominal_root(tmp_path), "-d", 210, "--raw", tmp_path / "elsewhere"], capsys)
    assert code == 0, err
    assert (tmp_path / "elsewhere" / "Dataset211_AbdomenMR" / "dataset.json").is_file()
    assert not nnunet_env.exists()


# ---------------------------------------------------------------------------------------------
# idempotence and refusals

def test_second_run_changes_nothing(tmp_path, nnunet_env, capsys):
    root = abdominal_root(tmp_path)
    run_main(convert_abdominal.main, ["-i", root, "-d", 210], capsys)
    before = snapshot(nnunet_env)
    code, out, _ = run_main(convert_abdominal.main, ["-i", root, "-d", 210], capsys)
    assert code == 0
    assert "Dataset210_AbdomenCT: up to date (2 cases, same input), nothing to do" in out
    assert "->" not in out
    assert snapshot(nnunet_env) == before


def test_moved_release_is_still_up_to_date(tmp_path, nnunet_env, capsys):
    root = abdominal_root(tmp_path)
    run_main(convert_abdominal.main, ["-i", root, "-d", 210], capsys)
    moved = root.rename(tmp_path / "moved")
    _, out, _ = run_main(convert_abdominal.main, ["-i", moved, "-d", 210], capsys)
    assert "Dataset211_AbdomenMR: up to date" in out


def test_changed_input_is_refused_then_replaced_with_overwrite(tmp_path, nnunet_env, capsys):
    root = abdominal_root(tmp_path)
    run_main(convert_abdominal.main, ["-i", root, "-d", 210, "--modalities", "mr"], capsys)
    label_file = nnunet_env / "Dataset211_AbdomenMR" / "labelsTr" / "MR_001.nii.gz"
    before = snapshot(nnunet_env)
    write_nifti(root / "CHAOST2/chaos_MR_T2_normalized/label_1.nii.gz", blob_label(3))
    code, _, err = run_main(convert_abdominal.main, ["-i", root, "-d", 210, "--modalities", "mr"], capsys)
    assert code == 2
    assert "Dataset211_AbdomenMR already exists and holds a different conversion (differs in: cases)" in err
    assert "--overwrite" in err
    assert snapshot(nnunet_env) == before
    code, out, err = run_main(convert_abdominal.main,
                              ["-i", root, "-d", 210, "--modalities", "mr", "--overwrite"], capsys)
    assert code == 0, err
    assert "Dataset211_AbdomenMR (1 cases, replaced)" in out
    np.testing.assert_array_equal(read_array(label_file), blob_label(3))
    assert sorted(p.name for p in nnunet_env.iterdir()) == ["Dataset211_AbdomenMR"]


def test_foreign_folder_is_refused(tmp_path, nnunet_env, capsys):
    (nnunet_env / "Dataset211_AbdomenMR").mkdir(parents=True)
    code, _, err = run_main(convert_abdominal.main, ["-i", abdominal_root(tmp_path), "-d", 210], capsys)
    assert code == 2 and f"was not written by this converter (no readable {MANIFEST_FILE})" in err
    assert sorted(p.name for p in nnunet_env.iterdir()) == ["Dataset211_AbdomenMR"], \
        "the refusal of the MR dataset must come before the CT dataset is written"


def test_incomplete_dataset_is_refused(tmp_path, nnunet_env, capsys):
    root = abdominal_root(tmp_path)
    run_main(convert_abdominal.main, ["-i", root, "-d", 210], capsys)
    (nnunet_env / "Dataset210_AbdomenCT" / "imagesTr" / "CT_005_0000.nii.gz").unlink()
    code, _, err = run_main(convert_abdominal.main, ["-i", root, "-d", 210], capsys)
    assert code == 2 and "is incomplete (imagesTr/CT_005_0000.nii.gz is missing)" in err


@pytest.mark.parametrize("variable", ["nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"])
def test_same_id_with_another_name_is_refused(tmp_path, nnunet_env, capsys, variable):
    other = Path(os.environ[variable]) / "Dataset210_SomethingElse"
    other.mkdir(parents=True)
    code, _, err = run_main(convert_abdominal.main, ["-i", abdominal_root(tmp_path), "-d", 210, "--overwrite"], capsys)
    assert code == 2
    assert f"cannot create Dataset210_AbdomenCT: {other} already uses id 210" in err
    other.rmdir()
    assert_nothing_written(nnunet_env)


def test_dataset_id_out_of_range(prostate_root, capsys):
    code, _, err = run_main(convert_prostate.main, ["-i", prostate_root, "-d", 995], capsys)
    assert code == 2 and "dataset id 1000 for ProstateHK is outside nnU-Net's range 1-999" in err


# ---------------------------------------------------------------------------------------------
# console scripts

def console_script(name):
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.skip(f"console script {name} is not installed next to {sys.executable} (pip install -e .)")
    return str(path)


def test_console_script_converts_and_fails_cleanly(prostate_root, nnunet_env):
    command = [console_script("nnUNetv2_desam_convert_prostate"), "-i", str(prostate_root), "-d", "201",
               "--sites", "RUNMC"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Dataset201_ProstateRUNMC (2 cases, written)" in done.stdout
    (prostate_root / "RUNMC" / "Case01_segmentation.nii.gz").unlink()
    failed = subprocess.run(command, capture_output=True, text=True)
    assert failed.returncode == 2
    assert "Traceback" not in failed.stderr and "RUNMC_Case01" in failed.stderr


# ---------------------------------------------------------------------------------------------
# real data (../shared/data)

def require_shared(*parts):
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test data not available: {path} is absent")
    return path


def test_real_abdominal_subset(tmp_path, nnunet_env, capsys):
    ct_source = require_shared("abdominal", "SABS", "sabs_CT_normalized")
    mr_source = require_shared("abdominal", "CHAOST2", "chaos_MR_T2_normalized")
    root = tmp_path / "abdominal"
    for source, relative, cases in ((ct_source, "SABS/sabs_CT_normalized", (1, 11)),
                                    (mr_source, "CHAOST2/chaos_MR_T2_normalized", (2, 10))):
        (root / relative).mkdir(parents=True)
        for k in cases:
            for kind in ("image", "label"):
                shutil.copy2(source / f"{kind}_{k}.nii.gz", root / relative)
    code, _, err = run_main(convert_abdominal.main, ["-i", root, "-d", 210], capsys)
    assert code == 0, err
    btcv_to_ours = np.array([0, 4, 2, 3, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0], dtype=np.uint8)
    for source, case, k, mapping in ((ct_source, "Dataset210_AbdomenCT/{}/CT_011", 11, btcv_to_ours),
                                     (mr_source, "Dataset211_AbdomenMR/{}/MR_010", 10, np.arange(5))):
        source_image = sitk.ReadImage(str(source / f"image_{k}.nii.gz"))
        image = sitk.ReadImage(str(nnunet_env / (case.format("imagesTr") + "_0000.nii.gz")))
        label = read_array(nnunet_env / (case.format("labelsTr") + ".nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source_image))
        np.testing.assert_allclose(image.GetSpacing(), source_image.GetSpacing())
        np.testing.assert_allclose(image.GetOrigin(), source_image.GetOrigin())
        np.testing.assert_array_equal(label, mapping[read_array(source / f"label_{k}.nii.gz")])
        assert set(np.unique(label)) == {0, 1, 2, 3, 4}
    _, out, _ = run_main(convert_abdominal.main, ["-i", root, "-d", 210], capsys)
    assert out.count("up to date (2 cases, same input)") == 2


def test_real_prostate_case_passes_nnunet_integrity_check(tmp_path, nnunet_env, capsys):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    source = require_shared("promise12_case00")
    site = tmp_path / "prostate" / "RUNMC"
    site.mkdir(parents=True)
    for name in ("Case00.nii.gz", "Case00_segmentation.nii.gz"):
        (site / name).symlink_to(source / name)
    code, _, err = run_main(convert_prostate.main, ["-i", site.parent, "-d", 201], capsys)
    assert code == 0, err
    dataset = nnunet_env / "Dataset201_ProstateRUNMC"
    verify_dataset_integrity(str(dataset), num_processes=1)
    np.testing.assert_array_equal(read_array(dataset / "labelsTr" / "RUNMC_Case00.nii.gz"),
                                  read_array(source / "Case00_segmentation.nii.gz"))
