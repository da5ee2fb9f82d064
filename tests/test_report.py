"""Tests of the scoring and reporting layer of the cross-domain experiments (CPU only, a few seconds)."""
import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunetv2_desam.experiments.report import (
    MEAN_OVER_CLASSES, OVERALL, PROTOCOL_FOREGROUND_SLICES, PROTOCOL_WHOLE_VOLUME, OverlayRow, Results,
    format_table, plot_bar_chart, plot_dice_vs_grid_size, plot_overlays, write_csv, write_markdown_table,
    write_per_case_json)
from nnunetv2_desam.experiments.scoring import (
    border_width, bootstrap_ci, dice_per_case_from_summary, foreground_slice_dice, score_folder_foreground_slices,
    stratified_bootstrap_ci, zero_slice_borders)

LABELS = {"background": 0, "liver": 1, "kidney": 2}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_summary(path, per_case: dict[str, dict[int, float]]) -> str:
    """A summary.json shaped like nnU-Net's (only the fields the extraction reads, NaN written as NaN)."""
    cases = [{"prediction_file": f"/pred/{case}.nii.gz", "reference_file": f"/gt/{case}.nii.gz",
              "metrics": {str(label): {"Dice": value, "IoU": value} for label, value in metrics.items()}}
             for case, metrics in per_case.items()]
    with open(path, "w") as file:
        json.dump({"metric_per_case": cases, "mean": {}, "foreground_mean": {}}, file)
    return str(path)


def _write_nifti(path, array: np.ndarray) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 3.0))
    sitk.WriteImage(image, str(path))


@pytest.fixture
def results(tmp_path) -> Results:
    """Two trainers on two targets. SiteB: one class; SiteC: liver and kidney, one NaN kidney Dice.

    Expected means (%): nnUNet SiteB 70, SiteC (80 + 50) / 2 = 65, Overall 67.5;
    DeSAM SiteB 90, SiteC (90 + 60) / 2 = 75, Overall 82.5.
    """
    site_c = {"nnUNet": {"c1": {1: 0.9, 2: 0.5}, "c2": {1: 0.7, 2: math.nan}},
              "DeSAM": {"c1": {1: 1.0, 2: 0.7}, "c2": {1: 0.8, 2: 0.5}}}
    site_b = {"nnUNet": {"b1": {"liver": 0.8}, "b2": {"liver": 0.6}},
              "DeSAM": {"b1": {"liver": 0.9}, "b2": {"liver": 0.9}}}
    collected = Results(PROTOCOL_WHOLE_VOLUME)
    for trainer in ("nnUNet", "DeSAM"):
        collected.add(trainer, "SiteB", site_b[trainer])
        summary = _write_summary(tmp_path / f"{trainer}_summary.json", site_c[trainer])
        collected.add(trainer, "SiteC", dice_per_case_from_summary(summary, LABELS, ".nii.gz"))
    return collected


def _markdown_cells(text: str, first_cell: str, table_index: int = 0) -> list[str]:
    """Cells of the row starting with ``first_cell`` in the ``table_index``-th Markdown table of ``text``."""
    tables = text.split("## ")[1:]
    for line in tables[table_index].splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell}")


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000


def test_summary_extraction_keeps_nan_and_ignores_background(tmp_path):
    summary = _write_summary(tmp_path / "summary.json", {"c1": {1: 0.9, 2: 0.5}, "c2": {1: 0.7, 2: math.nan}})
    per_case = dice_per_case_from_summary(summary, LABELS, ".nii.gz")
    assert list(per_case) == ["c1", "c2"]
    assert per_case["c1"] == {"liver": 0.9, "kidney": 0.5}
    assert per_case["c2"]["liver"] == 0.7 and math.isnan(per_case["c2"]["kidney"])


def test_bootstrap_ci_is_deterministic_brackets_the_mean_and_excludes_nan():
    values = [0.91, 0.72, 0.85, 0.64, 0.88, 0.79, math.nan]
    mean, low, high = bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) == (mean, low, high)
    assert mean == pytest.approx(np.mean(values[:-1]))
    assert low < mean < high
    assert 0.64 <= low and high <= 0.91


def test_bootstrap_ci_edge_cases():
    assert bootstrap_ci([0.8]) == (0.8, 0.8, 0.8)
    assert bootstrap_ci([0.8, math.nan]) == (0.8, 0.8, 0.8)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert all(math.isnan(v) for v in bootstrap_ci([math.nan]))


def test_bootstrap_ci_over_classes_is_mean_of_class_means():
    cases_by_classes = [[0.9, 0.5], [0.7, math.nan]]
    mean, low, high = bootstrap_ci(cases_by_classes)
    assert mean == pytest.approx((0.8 + 0.5) / 2)
    assert low <= mean <= high


def test_stratified_bootstrap_weights_every_group_equally():
    mean, low, high = stratified_bootstrap_ci([[0.8, 0.6], [0.5, 0.5, 0.5, 0.5]])
    assert mean == pytest.approx((0.7 + 0.5) / 2)
    assert (0.6 + 0.5) / 2 <= low <= mean <= high <= (0.8 + 0.5) / 2
    assert all(math.isnan(v) for v in stratified_bootstrap_ci([[0.8], []]))


def _centred(labels: np.ndarray) -> np.ndarray:
    """4×4 slices placed in the middle of 16×16 ones, inside the 3 px the paper protocol zeroes at each border."""
    padded = np.zeros((labels.shape[0], 16, 16), dtype=labels.dtype)
    padded[:, 6:10, 6:10] = labels
    return padded


def _hand_made_case_a() -> tuple[np.ndarray, np.ndarray]:
    """4 slices of 4x4 (centred in 16x16 by the callers). Reference liver: 4 voxels in slices 1 and 2. Prediction: slice 1 right, slice 2 missed,
    8 false liver voxels in slice 3 (no reference foreground) and 2 false kidney voxels in slice 0.

    Whole volume: liver 2*4 / (8 + 12) = 0.4, kidney 0 (false positives only).
    Foreground slices (1, 2): liver 2*4 / (8 + 4) = 2/3, kidney NaN (absent from both in those slices).
    """
    reference = np.zeros((4, 4, 4), dtype=np.uint8)
    reference[1, :2, :2] = 1
    reference[2, 2:, 2:] = 1
    prediction = np.zeros_like(reference)
    prediction[1, :2, :2] = 1
    prediction[3, :2, :] = 1
    prediction[0, 0, :2] = 2
    return reference, prediction


def test_foreground_slice_dice_by_hand():
    reference, prediction = (_centred(a) for a in _hand_made_case_a())
    scores = foreground_slice_dice(reference[None], prediction[None], LABELS)
    assert scores["liver"] == pytest.approx(2 / 3)
    assert math.isnan(scores["kidney"])


def test_foreground_slices_zero_the_prediction_borders_as_the_authors_do():
    """50 of 256 px at each border: 100 rows and 75 columns of 512×384 slices; the reference is not zeroed."""
    assert [border_width(size) for size in (256, 512, 384, 16, 4)] == [50, 100, 75, 3, 1]
    reference = np.zeros((2, 512, 384), dtype=np.uint8)
    reference[0, 200:300, 150:250] = 1  # liver, 10,000 px inside
    reference[0, :100, :75] = 2  # kidney, 7,500 px, all in the zeroed border
    prediction = reference.copy()
    prediction[0, 400:450, 300:384] = 1  # false liver: rows 400-411 and columns 300-308 survive (412 = 512 - 100, 309 = 384 - 75)
    prediction[1, 250:260, 190:200] = 1  # a slice without reference foreground is not scored
    scores = foreground_slice_dice(reference, prediction, LABELS)
    assert scores["liver"] == pytest.approx(2 * 10_000 / (10_000 + 10_000 + 12 * 9))
    assert scores["kidney"] == 0.0
    assert zero_slice_borders(prediction)[0, 400:450, 300:384].sum() == 12 * 9


def test_nnunet_evaluation_and_foreground_slices_on_nifti(tmp_path):
    reference_a, prediction_a = (_centred(a) for a in _hand_made_case_a())
    reference_b = np.zeros((4, 4, 4), dtype=np.uint8)
    reference_b[0, 1:3, 1:3] = 1
    reference_b[3, :2, :2] = 2
    reference_c = np.zeros((4, 4, 4), dtype=np.uint8)
    reference_c[2, :, :2] = 1
    reference_b, reference_c = _centred(reference_b), _centred(reference_c)
    cases = {"case_a": (reference_a, prediction_a), "case_b": (reference_b, reference_b),
             "case_c": (reference_c, reference_c)}
    gt_folder, pred_folder = tmp_path / "gt", tmp_path / "pred"
    gt_folder.mkdir(), pred_folder.mkdir()
    for case, (reference, prediction) in cases.items():
        _write_nifti(gt_folder / f"{case}.nii.gz", reference)
        _write_nifti(pred_folder / f"{case}.nii.gz", prediction)
    summary_file = str(tmp_path / "summary.json")
    summary = compute_metrics_on_folder(str(gt_folder), str(pred_folder), summary_file,
                                        image_reader_writer=SimpleITKIO(), file_ending=".nii.gz",
                                        regions_or_labels=[1, 2], ignore_label=None, num_processes=1)

    whole = dice_per_case_from_summary(summary_file, LABELS, ".nii.gz")
    assert whole["case_a"]["liver"] == pytest.approx(0.4) and whole["case_a"]["kidney"] == 0.0
    assert whole["case_b"] == {"liver": 1.0, "kidney": 1.0}
    assert whole["case_c"]["liver"] == 1.0 and math.isnan(whole["case_c"]["kidney"])

    slices = score_folder_foreground_slices(str(gt_folder), str(pred_folder), LABELS, ".nii.gz")
    assert slices["case_a"]["liver"] == pytest.approx(2 / 3) and math.isnan(slices["case_a"]["kidney"])
    assert slices["case_b"] == {"liver": 1.0, "kidney": 1.0}
    assert slices["case_c"]["liver"] == 1.0 and math.isnan(slices["case_c"]["kidney"])

    collected = Results(PROTOCOL_WHOLE_VOLUME)
    collected.add("nnUNet", "SiteC", whole)
    for name, label in (("liver", 1), ("kidney", 2)):
        assert collected.class_ci("nnUNet", "SiteC", name)[0] == pytest.approx(summary["mean"][label]["Dice"])
    assert collected.target_ci("nnUNet", "SiteC")[0] == pytest.approx(summary["foreground_mean"]["Dice"])


def test_markdown_table(results, tmp_path):
    path = tmp_path / "table.md"
    write_markdown_table(results, str(path))
    text = path.read_text()
    assert f"protocol: {PROTOCOL_WHOLE_VOLUME}" in text and "95% percentile bootstrap CI over cases" in text
    assert _markdown_cells(text, "Method") == ["Method", "SiteB", "SiteC", OVERALL]
    baseline = _markdown_cells(text, "nnUNet")
    assert [cell.split(" [")[0] for cell in baseline[1:]] == ["70.00", "65.00", "67.50"]
    desam = _markdown_cells(text, "DeSAM")
    assert desam[1] == "90.00 [90.0, 90.0]"
    assert [cell.split(" [")[0] for cell in desam[2:]] == ["75.00", "82.50"]
    for cell in baseline[1:] + desam[1:]:
        mean, low, high = (float(v) for v in cell.replace("[", "").replace("]", "").replace(",", "").split())
        assert low <= mean <= high
    assert _markdown_cells(text, "Method", table_index=2) == ["Method", "liver", "kidney"]
    assert _markdown_cells(text, "nnUNet", table_index=2)[2] == "50.00 [50.0, 50.0]"


def test_csv_long_format(results, tmp_path):
    path = tmp_path / "table.csv"
    write_csv(results, str(path))
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 * (2 + 3 + 1)
    by_key = {(row["trainer"], row["target"], row["class"]): row for row in rows}
    kidney = by_key[("nnUNet", "SiteC", "kidney")]
    assert kidney["n_cases"] == "1" and float(kidney["mean_dice"]) == pytest.approx(0.5)
    assert float(kidney["ci_low"]) == float(kidney["ci_high"]) == pytest.approx(0.5)
    assert float(by_key[("nnUNet", "SiteC", MEAN_OVER_CLASSES)]["mean_dice"]) == pytest.approx(0.65)
    overall = by_key[("DeSAM", OVERALL, MEAN_OVER_CLASSES)]
    assert overall["n_cases"] == "4" and float(overall["mean_dice"]) == pytest.approx(0.825)
    assert {row["protocol"] for row in rows} == {PROTOCOL_WHOLE_VOLUME}
    assert all(float(row["ci_low"]) <= float(row["mean_dice"]) <= float(row["ci_high"]) for row in rows)


def test_per_case_json(results, tmp_path):
    path = tmp_path / "per_case.json"
    write_per_case_json(results, str(path))
    document = json.loads(path.read_text())
    assert document["protocol"] == PROTOCOL_WHOLE_VOLUME and "bootstrap" in document["ci_method"]
    rows = {(row["trainer"], row["target"], row["class"]): row["per_case"] for row in document["rows"]}
    assert len(rows) == 6
    assert rows[("nnUNet", "SiteC", "kidney")] == {"c1": 0.5, "c2": None}
    assert rows[("DeSAM", "SiteB", "liver")] == {"b1": 0.9, "b2": 0.9}


def test_format_table_marks_missing_targets():
    collected = Results(PROTOCOL_FOREGROUND_SLICES)
    collected.add("nnUNet", "SiteB", {"b1": {"prostate": 0.8}, "b2": {"prostate": 0.6}})
    collected.add("nnUNet", "SiteC", {"c1": {"prostate": 0.5}})
    collected.add("SAM", "SiteB", {"b1": {"prostate": 0.4}})
    text = format_table(collected)
    lines = text.splitlines()
    assert lines[0].startswith(f"Dice (%), protocol: {PROTOCOL_FOREGROUND_SLICES}")
    sam = next(line for line in lines if line.startswith("SAM"))
    assert sam.split() == ["SAM", "40.00", "[40.0,", "40.0]", "n/a", "n/a"]
    nnunet = next(line for line in lines if line.startswith("nnUNet"))
    assert nnunet.split()[1] == "70.00" and "60.00 [" in nnunet


def test_in_domain_column_comes_first_and_stays_out_of_overall(results, tmp_path):
    results.add("nnUNet", "SiteA (in-domain)", {"a1": {"liver": 1.0, "kidney": 0.8}}, in_domain=True)
    assert results.targets == ["SiteA (in-domain)", "SiteB", "SiteC"]
    assert results.shifted_targets == ["SiteB", "SiteC"]
    assert results.overall_ci("nnUNet")[0] == pytest.approx(0.675)
    assert "in-domain column(s) excluded" in results.header
    write_markdown_table(results, str(tmp_path / "table.md"))
    text = (tmp_path / "table.md").read_text()
    assert _markdown_cells(text, "Method") == ["Method", "SiteA (in-domain)", "SiteB", "SiteC", OVERALL]
    assert _markdown_cells(text, "nnUNet")[1] == "90.00 [90.0, 90.0]"
    assert _markdown_cells(text, "DeSAM")[1] == "n/a"
    write_csv(results, str(tmp_path / "table.csv"))
    with open(tmp_path / "table.csv", newline="") as file:
        overall = {row["trainer"]: row for row in csv.DictReader(file) if row["target"] == OVERALL}
    assert overall["nnUNet"]["n_cases"] == "4" and float(overall["nnUNet"]["mean_dice"]) == pytest.approx(0.675)
    write_per_case_json(results, str(tmp_path / "per_case.json"))
    rows = json.loads((tmp_path / "per_case.json").read_text())["rows"]
    assert {row["target"] for row in rows if row["in_domain"]} == {"SiteA (in-domain)"}


def test_bar_chart_and_grid_size_plot(results, tmp_path):
    bars = plot_bar_chart(results, str(tmp_path / "bars.png"), note="DEMO ONLY, untrained encoder")
    _assert_png(tmp_path / "bars.png")
    assert bars.get_suptitle() == "DEMO ONLY, untrained encoder"
    grid = plot_dice_vs_grid_size(list(range(3, 17)), np.linspace(0.70, 0.80, 14), np.linspace(0.65, 0.75, 14),
                                  np.linspace(0.75, 0.85, 14), str(tmp_path / "grid.png"))
    _assert_png(tmp_path / "grid.png")
    assert grid.get_suptitle() == "" and grid.axes[0].get_ylim() == pytest.approx((64.0, 86.0))


@pytest.mark.parametrize("dice, expected", [(0.45, (40.0, 50.0)), (0.995, (90.0, 100.0)), (0.0, (0.0, 10.0))])
def test_a_flat_grid_size_curve_is_drawn_flat(tmp_path, dice, expected):
    """No auto-zoom into a band a thousandth wide: the y axis spans at least 10 Dice points, within 0-100 %."""
    flat = np.full(4, dice)
    figure = plot_dice_vs_grid_size([3, 5, 9, 16], flat, flat, flat, str(tmp_path / "flat.png"))
    assert figure.axes[0].get_ylim() == pytest.approx(expected)


def test_overlays(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for target in ("SiteB", "SiteC"):
        image = rng.normal(100, 20, size=(5, 32, 32)).astype(np.float32)
        reference = np.zeros((5, 32, 32), dtype=np.uint8)
        reference[3, 8:24, 8:20] = 1
        reference[3, 10:14, 22:28] = 2
        baseline, desam = reference.copy(), reference.copy()
        baseline[3, 8:24, 8:12] = 0
        desam[3, 20:24, 8:20] = 0
        paths = {}
        for name, array in (("image", image), ("gt", reference), ("nnUNet", baseline), ("DeSAM", desam)):
            paths[name] = tmp_path / f"{target}_{name}.nii.gz"
            _write_nifti(paths[name], array)
        rows.append(OverlayRow(target, str(paths["image"]), str(paths["gt"]),
                               {"nnUNet": str(paths["nnUNet"]), "DeSAM": str(paths["DeSAM"])}))
    figure = plot_overlays(str(tmp_path / "overlays.png"), rows, classes=LABELS, note="DEMO ONLY")
    _assert_png(tmp_path / "overlays.png")
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["liver", "kidney"]
    assert figure.axes[0].get_ylabel() == "SiteB\nslice 3" and figure.get_suptitle() == "DEMO ONLY"
    with pytest.raises(ValueError):
        plot_overlays(str(tmp_path / "bad.png"), [rows[0], OverlayRow("x", rows[1].image, rows[1].ground_truth, {})])
