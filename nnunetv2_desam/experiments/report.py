"""Table 2-style reports and figures of the cross-domain experiments.

Collect the per-case Dice of every (trainer, target domain) in a :class:`Results` (one protocol per
:class:`Results`), then write it with :func:`write_markdown_table`, :func:`write_csv`, :func:`write_per_case_json`,
:func:`plot_bar_chart` or print :func:`format_table`. Every output states the protocol and the CI method.
Dice is stored and written to CSV / JSON as a fraction in [0, 1]; tables and figures show percent.
Figures are drawn on matplotlib ``Figure`` objects rendered with the Agg canvas (no pyplot, no display).
"""
import csv
import json
import math
import textwrap
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from nnunetv2_desam.experiments.scoring import FOREGROUND_SLICES_PROTOCOL, bootstrap_ci, stratified_bootstrap_ci, usable_cases

PROTOCOL_WHOLE_VOLUME = "whole-volume Dice (nnU-Net evaluation)"
PROTOCOL_FOREGROUND_SLICES = FOREGROUND_SLICES_PROTOCOL
MEAN_OVER_CLASSES = "mean over classes"
OVERALL = "Overall"
MIN_DICE_SPAN = 10.0
"""Smallest y range (Dice %) of the grid-size plot, so that a flat curve is drawn flat, not zoomed into noise."""
NOTE_COLOUR = "firebrick"
CSV_COLUMNS = ["trainer", "target", "class", "n_cases", "mean_dice", "ci_low", "ci_high", "protocol", "ci_method"]


@dataclass
class Results:
    """Per-case Dice of every (trainer, target domain, class name) under one scoring protocol.

    ``rows[(trainer, target, class_name)]`` is ``{case_id: dice}`` (NaN = class absent from reference and
    prediction, excluded from means). Trainers, targets and classes keep their insertion order in every output.
    ``n_boot``, ``alpha`` and ``seed`` set the percentile bootstrap used for all confidence intervals.
    ``in_domain`` names the columns scored on the training domain itself (held-out cases): shown first,
    left out of ``Overall``, which measures generalisation to the other domains.
    """
    protocol: str
    rows: dict = field(default_factory=dict)
    n_boot: int = 1000
    alpha: float = 0.05
    seed: int = 0
    in_domain: list = field(default_factory=list)

    def add(self, trainer: str, target: str, per_case: dict[str, dict[str, float]], in_domain: bool = False) -> None:
        """Store the ``{case_id: {class_name: dice}}`` of ``scoring`` for ``trainer`` predicting ``target``
        (``in_domain``: held-out cases of the domain ``trainer`` was trained on)."""
        if in_domain and target not in self.in_domain:
            self.in_domain.append(target)
        for case_id, per_class in per_case.items():
            for class_name, value in per_class.items():
                self.rows.setdefault((trainer, target, class_name), {})[case_id] = float(value)

    @property
    def trainers(self) -> list[str]:
        """Trainer names (table rows), in insertion order."""
        return list(dict.fromkeys(key[0] for key in self.rows))

    @property
    def targets(self) -> list[str]:
        """Column names: the in-domain columns, then the target domains, each in insertion order."""
        return [*self.in_domain, *self.shifted_targets]

    @property
    def shifted_targets(self) -> list[str]:
        """The target domains other than the training domain: the columns ``Overall`` averages."""
        return [target for target in dict.fromkeys(key[1] for key in self.rows) if target not in self.in_domain]

    def classes(self, target: str) -> list[str]:
        """Class names scored on ``target``, in insertion order."""
        return list(dict.fromkeys(key[2] for key in self.rows if key[1] == target))

    @property
    def ci_method(self) -> str:
        """Description of the confidence interval, printed in every output."""
        return (f"{100 * (1 - self.alpha):g}% percentile bootstrap CI over cases "
                f"({self.n_boot} resamples, seed {self.seed})")

    @property
    def header(self) -> str:
        """The header line of the tables: unit, protocol, CI method and what ``Overall`` averages."""
        overall = (f"; {OVERALL}: mean over the target domains, in-domain column(s) excluded" if self.in_domain
                   else "")
        return f"Dice (%), protocol: {self.protocol}; {self.ci_method}{overall}"

    def case_matrix(self, trainer: str, target: str) -> np.ndarray:
        """Dice of ``trainer`` on ``target`` as an (n_cases, n_classes) array (NaN where missing)."""
        per_class = [self.rows.get((trainer, target, name), {}) for name in self.classes(target)]
        case_ids = list(dict.fromkeys(case_id for values in per_class for case_id in values))
        return np.array([[values.get(case_id, math.nan) for values in per_class] for case_id in case_ids])

    def _bootstrap(self, values) -> tuple[float, float, float]:
        return bootstrap_ci(values, self.n_boot, self.alpha, self.seed)

    def class_ci(self, trainer: str, target: str, class_name: str) -> tuple[float, float, float]:
        """(mean, low, high) Dice of one class over the cases of ``target``."""
        return self._bootstrap(list(self.rows.get((trainer, target, class_name), {}).values()))

    def target_ci(self, trainer: str, target: str) -> tuple[float, float, float]:
        """(mean, low, high) of the mean over classes of the class means on ``target`` (a Table 2 cell)."""
        return self._bootstrap(self.case_matrix(trainer, target))

    def overall_ci(self, trainer: str) -> tuple[float, float, float]:
        """(mean, low, high) of the mean over the shifted targets of :meth:`target_ci`, stratified bootstrap CI."""
        matrices = [self.case_matrix(trainer, target) for target in self.shifted_targets]
        return stratified_bootstrap_ci(matrices, self.n_boot, self.alpha, self.seed)


def _format_ci(ci: tuple[float, float, float]) -> str:
    mean, low, high = ci
    return "n/a" if math.isnan(mean) else f"{100 * mean:.2f} [{100 * low:.1f}, {100 * high:.1f}]"


def _main_table(results: Results) -> list[list[str]]:
    rows = [["Method", *results.targets, OVERALL]]
    for trainer in results.trainers:
        cells = [_format_ci(results.target_ci(trainer, target)) for target in results.targets]
        rows.append([trainer, *cells, _format_ci(results.overall_ci(trainer))])
    return rows


def _class_table(results: Results, target: str) -> list[list[str]]:
    classes = results.classes(target)
    rows = [["Method", *classes]]
    for trainer in results.trainers:
        rows.append([trainer, *(_format_ci(results.class_ci(trainer, target, name)) for name in classes)])
    return rows


def _sections(results: Results) -> list[tuple[str, list[list[str]]]]:
    """(title, table) of the Table 2 summary followed by the per-class table of each target."""
    sections = [("Mean Dice over classes per target domain", _main_table(results))]
    sections += [(f"Per-class Dice: {target}", _class_table(results, target)) for target in results.targets]
    return sections


def _markdown(table: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(row) + " |" for row in table]
    lines.insert(1, "| " + " | ".join(["---"] + ["---:"] * (len(table[0]) - 1)) + " |")
    return lines


def _aligned(table: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def format_table(results: Results) -> str:
    """Plain-text version of the Markdown report (header line, Table 2 summary, per-class tables) for a console."""
    lines = [results.header]
    for title, table in _sections(results):
        lines += ["", title, *_aligned(table)]
    return "\n".join(lines) + "\n"


def write_markdown_table(results: Results, path: str) -> None:
    """Write the Table 2-style report: one row per trainer, one column per target (mean Dice over classes in %,
    ``mean [low, high]`` CI) plus ``Overall`` (mean over targets), then a per-class table for each target."""
    lines = ["# Cross-domain Dice", "", results.header]
    for title, table in _sections(results):
        lines += ["", f"## {title}", "", *_markdown(table)]
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")


def _n_cases(results: Results, trainer: str, target: str, class_name: str | None = None) -> int:
    """Cases that enter the mean of one class (or, without ``class_name``, of the mean over classes)."""
    if class_name is None:
        return len(usable_cases(results.case_matrix(trainer, target)))
    return len(usable_cases(list(results.rows.get((trainer, target, class_name), {}).values())))


def _summary_rows(results: Results) -> list[dict]:
    """One dict per CSV row: every class, the mean over classes of every target, and the overall mean."""
    rows = []
    for trainer in results.trainers:
        for target in results.targets:
            rows += [(trainer, target, name, _n_cases(results, trainer, target, name),
                      results.class_ci(trainer, target, name)) for name in results.classes(target)]
            rows.append((trainer, target, MEAN_OVER_CLASSES, _n_cases(results, trainer, target),
                         results.target_ci(trainer, target)))
        n_overall = sum(_n_cases(results, trainer, target) for target in results.shifted_targets)
        rows.append((trainer, OVERALL, MEAN_OVER_CLASSES, n_overall, results.overall_ci(trainer)))
    return [dict(zip(CSV_COLUMNS, (*row[:4], *row[4], results.protocol, results.ci_method))) for row in rows]


def write_csv(results: Results, path: str) -> None:
    """Write the long-format table: columns :data:`CSV_COLUMNS`, Dice as fractions, ``n_cases`` = cases that
    enter the mean. Besides one row per (trainer, target, class) it has a ``mean over classes`` row per
    (trainer, target) and an ``Overall`` row per trainer, i.e. the numbers of the Markdown table."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(_summary_rows(results))


def write_per_case_json(results: Results, path: str) -> None:
    """Write ``{"protocol", "ci_method", "dice_unit", "rows": [{"trainer", "target", "in_domain", "class", "per_case":
    {case_id: dice or null}}]}``; null is a NaN Dice (class absent from reference and prediction)."""
    rows = [{"trainer": trainer, "target": target, "in_domain": target in results.in_domain, "class": name,
             "per_case": {case_id: None if math.isnan(value) else value for case_id, value in per_case.items()}}
            for (trainer, target, name), per_case in results.rows.items()]
    document = {"protocol": results.protocol, "ci_method": results.ci_method, "dice_unit": "fraction in [0, 1]",
                "rows": rows}
    with open(path, "w", encoding="utf-8") as file:
        json.dump(document, file, indent=2, allow_nan=False)


def _save(figure: Figure, png_path: str, note: str = "") -> Figure:
    """Write ``figure`` as PNG, with ``note`` (e.g. the demo's disclaimer) on top of it; returns it."""
    if note:
        width = max(40, int(figure.get_figwidth() * 13))
        figure.suptitle(textwrap.fill(note, width), color=NOTE_COLOUR, fontsize=8)
    FigureCanvasAgg(figure)
    figure.savefig(png_path, dpi=150)
    return figure


def plot_bar_chart(results: Results, png_path: str, note: str = "") -> Figure:
    """Grouped bar chart: target domains (and ``Overall``) on x, one bar per trainer, CI error bars, in %;
    ``note`` goes on top."""
    groups = [*results.targets, OVERALL]
    trainers = results.trainers
    width = 0.8 / max(len(trainers), 1)
    figure = Figure(figsize=(max(6.0, 1.4 * len(groups) + 2), 4.5), layout="constrained")
    axes = figure.add_subplot()
    for index, trainer in enumerate(trainers):
        cis = [results.target_ci(trainer, target) for target in results.targets] + [results.overall_ci(trainer)]
        means, lows, highs = (100 * np.array(values) for values in zip(*cis))
        positions = np.arange(len(groups)) + (index - (len(trainers) - 1) / 2) * width
        axes.bar(positions, means, width, yerr=[means - lows, highs - means], capsize=3, label=trainer)
    axes.set_xticks(np.arange(len(groups)), groups)
    axes.set_ylabel("Dice (%)")
    axes.set_ylim(0, 100)
    axes.set_title(f"Cross-domain Dice, {results.protocol}\n{results.ci_method}", fontsize=10)
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=max(len(trainers), 1),
                frameon=False)
    return _save(figure, png_path, note)


def plot_dice_vs_grid_size(grid_sizes, dice_means, ci_lows, ci_highs, png_path: str, label: str = "DeSAM",
                           protocol: str = PROTOCOL_WHOLE_VOLUME, note: str = "") -> Figure:
    """Fig. 3: Dice (fractions in, % shown) versus the number of grid points per side, with a shaded CI band.

    In: equally long sequences of grid sizes (e.g. 3..16), mean Dice and CI bounds (e.g. from :func:`bootstrap_ci`).
    The y axis spans at least :data:`MIN_DICE_SPAN` points within 0-100 %; ``note`` goes on top.
    """
    means, lows, highs = (100 * np.asarray(values, dtype=float) for values in (dice_means, ci_lows, ci_highs))
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(grid_sizes, means, marker="o", label=label)
    axes.fill_between(grid_sizes, lows, highs, alpha=0.25, label="95% CI")
    axes.set_xticks(list(grid_sizes))
    axes.set_xlabel("grid points per side")
    axes.set_ylabel("Dice (%)")
    axes.set_ylim(*_dice_range(np.concatenate([means, lows, highs])))
    axes.set_title(f"Dice vs. prompt grid size, {protocol}", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, png_path, note)


def _dice_range(values: np.ndarray) -> tuple[float, float]:
    """The data's range (Dice %) with 5 % margins, widened to :data:`MIN_DICE_SPAN` around its middle, within 0-100."""
    values = values[np.isfinite(values)]
    low, high = (float(values.min()), float(values.max())) if len(values) else (0.0, 100.0)
    margin = max(0.05 * (high - low), (MIN_DICE_SPAN - (high - low)) / 2)
    low, high = low - margin, high + margin
    shift = max(0.0, -low) - max(0.0, high - 100.0)
    return max(0.0, low + shift), min(100.0, high + shift)


@dataclass
class OverlayRow:
    """One row of :func:`plot_overlays`: a target domain's image, its reference and the predictions to show.

    ``image``, ``ground_truth`` and the values of ``predictions`` are NIfTI paths of the same case (e.g. the
    nnU-Net raw ``imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz`` and each trainer's prediction);
    ``predictions`` maps method name (column title) to path, baseline first.
    """
    target: str
    image: str
    ground_truth: str
    predictions: dict[str, str]


def _read(path: str) -> tuple[np.ndarray, float]:
    """(Z, Y, X) array of a NIfTI file and the in-plane pixel aspect ratio (y spacing / x spacing)."""
    image = sitk.ReadImage(path)
    spacing = image.GetSpacing()
    return sitk.GetArrayFromImage(image), spacing[1] / spacing[0]


def _label_colours(labels) -> np.ndarray:
    """RGB colour of each label value k > 0: the k-th tab10 colour."""
    colours = np.array(colormaps["tab10"].colors)
    return colours[(np.asarray(labels, dtype=int) - 1) % len(colours)]


def _label_overlay(labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGBA image colouring label k with :func:`_label_colours` and leaving background transparent."""
    rgba = np.zeros((*labels.shape, 4))
    foreground = labels > 0
    rgba[foreground, :3] = _label_colours(labels[foreground])
    rgba[foreground, 3] = alpha
    return rgba


def _draw_panel(axes, image: np.ndarray, aspect: float, labels: np.ndarray | None) -> None:
    low, high = np.percentile(image, [0.5, 99.5])
    axes.imshow(image, cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="nearest")
    if labels is not None:
        axes.imshow(_label_overlay(labels), aspect=aspect, interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([])


def plot_overlays(png_path: str, rows: list[OverlayRow], classes: dict[str, int] | None = None,
                  note: str = "") -> Figure:
    """Fig. 4: one row per target domain; columns image, ground truth, then each prediction (titled by method),
    label maps as coloured overlays on the grey image, on the slice (axis 0) with the most reference foreground
    (its index in the row's label). ``classes`` (``{name: label}``, as in dataset.json; background ignored) gives
    the colour legend; ``note`` goes on top. All rows must list the same methods in the same order."""
    methods = list(rows[0].predictions)
    if any(list(row.predictions) != methods for row in rows):
        raise ValueError("every OverlayRow needs the same prediction methods in the same order")
    titles = ["Image", "Ground truth", *methods]
    figure = Figure(figsize=(2.6 * len(titles), 2.8 * len(rows)), layout="constrained")
    grid = figure.subplots(len(rows), len(titles), squeeze=False)
    for axes_row, row in zip(grid, rows):
        image, aspect = _read(row.image)
        label_maps = [_read(path)[0] for path in (row.ground_truth, *row.predictions.values())]
        if any(labels.shape != image.shape for labels in label_maps):
            raise ValueError(f"{row.target}: image and label maps differ in shape")
        index = int(np.argmax(np.count_nonzero(label_maps[0], axis=(1, 2))))
        _draw_panel(axes_row[0], image[index], aspect, None)
        for axes, labels in zip(axes_row[1:], label_maps):
            _draw_panel(axes, image[index], aspect, labels[index])
        axes_row[0].set_ylabel(f"{row.target}\nslice {index}")
    for axes, title in zip(grid[0], titles):
        axes.set_title(title, fontsize=10)
    foreground = {name: value for name, value in (classes or {}).items() if value != 0}
    if foreground:
        handles = [Patch(facecolor=colour, alpha=0.5, label=name)
                   for name, colour in zip(foreground, _label_colours(list(foreground.values())))]
        figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9, frameon=False)
    return _save(figure, png_path, note)
