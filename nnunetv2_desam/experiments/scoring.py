"""Per-case Dice extraction and bootstrap confidence intervals for the cross-domain experiments.

Both scoring protocols return the same *per-case structure*::

    {case_id: {class_name: dice}}

with ``case_id`` the prediction file name without its file ending and ``dice`` a float in [0, 1].

NaN policy: nnU-Net gives NaN Dice when a class is absent from both the reference and the prediction of a case
(0 / 0). Such case-class pairs are kept as NaN in the per-case structure and are *excluded* from that class's
mean and bootstrap (exactly like nnU-Net's ``np.nanmean`` in ``summary.json``), see :func:`bootstrap_ci`.

``labels`` arguments are ``{class_name: label_value}`` as in ``dataset.json``; the background entry (value 0) is
ignored, so ``dataset.json['labels']`` can be passed as is. Only integer labels are supported (no regions).
"""
import os
import warnings

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join, load_json, subfiles
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from scipy.stats import bootstrap

AUTHORS_BORDER_PIXELS = 50  # zeroed at each border of their predictions (utils/dice_calculate.py, edge_set_zero=50)
AUTHORS_SLICE_SIZE = 256  # ... of 256×256 slices
FOREGROUND_SLICES_PROTOCOL = (f"foreground slices only, {AUTHORS_BORDER_PIXELS}/{AUTHORS_SLICE_SIZE} of each slice "
                              f"axis zeroed at the prediction's borders (paper protocol)")


def _foreground(labels: dict[str, int]) -> dict[str, int]:
    return {name: int(value) for name, value in labels.items() if int(value) != 0}


def _case_id(path: str, file_ending: str) -> str:
    name = os.path.basename(path)
    return name[:-len(file_ending)] if name.endswith(file_ending) else name


def dice_per_case_from_summary(summary_file: str, labels: dict[str, int],
                               file_ending: str) -> dict[str, dict[str, float]]:
    """Whole-volume Dice per case and class, read from an nnU-Net ``summary.json``.

    In: path of the ``summary.json`` written by ``compute_metrics_on_folder``, ``{class_name: label}`` and the
    dataset file ending (e.g. ``'.nii.gz'``). Out: ``{case_id: {class_name: dice}}`` (NaN kept, see module doc).
    """
    summary = load_json(summary_file)
    classes = _foreground(labels)
    return {_case_id(case['prediction_file'], file_ending):
            {name: float(case['metrics'][str(value)]['Dice']) for name, value in classes.items()}
            for case in summary['metric_per_case']}


def _dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Dice of two boolean masks of equal shape as nnU-Net's evaluation computes it; NaN when both are empty."""
    tp, fp, fn, _ = compute_tp_fp_fn_tn(reference, prediction)
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator else float('nan')


def border_width(size: int) -> int:
    """Pixels zeroed at each end of a slice axis of ``size`` pixels: the authors' 50 of 256, scaled, rounded half up."""
    return int(AUTHORS_BORDER_PIXELS * size / AUTHORS_SLICE_SIZE + 0.5)


def zero_slice_borders(prediction: np.ndarray) -> np.ndarray:
    """A copy of (Z, Y, X) labels with ``border_width(Y)`` rows and ``border_width(X)`` columns set to 0 at every edge.

    The authors score 256×256 slices (every slice resized to 256² before SAM) with 50 px zeroed at each border of
    the prediction, the reference untouched; the same fraction of each axis (50/256 = 19.5 %) is zeroed here.
    """
    rows, columns = border_width(prediction.shape[1]), border_width(prediction.shape[2])
    zeroed = np.zeros_like(prediction)
    zeroed[:, rows:prediction.shape[1] - rows, columns:prediction.shape[2] - columns] = \
        prediction[:, rows:prediction.shape[1] - rows, columns:prediction.shape[2] - columns]
    return zeroed


def foreground_slice_dice(reference: np.ndarray, prediction: np.ndarray,
                          labels: dict[str, int]) -> dict[str, float]:
    """Dice per class restricted to the slices where the reference has any foreground (paper protocol).

    In: label maps of shape (Z, Y, X) (or (1, Z, Y, X) as returned by nnU-Net's ``read_seg``); slices are taken
    along Z, the slowest axis. A slice is kept when the reference has any non-zero label in it; the prediction's
    slice borders are zeroed as the authors do (:func:`zero_slice_borders`); the Dice of each class is then
    computed over all kept slices stacked. Out: ``{class_name: dice}``; NaN when a class is absent from the
    reference and the prediction in the kept slices.
    """
    reference, prediction = reference.reshape(reference.shape[-3:]), prediction.reshape(prediction.shape[-3:])
    if reference.shape != prediction.shape:
        raise ValueError(f'shape mismatch: reference {reference.shape} vs prediction {prediction.shape}')
    kept = np.any(reference != 0, axis=(1, 2))
    reference, prediction = reference[kept], zero_slice_borders(prediction[kept])
    return {name: _dice(reference == value, prediction == value) for name, value in _foreground(labels).items()}


def score_folder_foreground_slices(gt_folder: str, pred_folder: str, labels: dict[str, int],
                                   file_ending: str) -> dict[str, dict[str, float]]:
    """Foreground-slice Dice (:func:`foreground_slice_dice`) for every prediction in ``pred_folder``.

    Like nnU-Net's evaluation, the cases are the prediction files; each needs a reference of the same name in
    ``gt_folder``. Files are read with nnU-Net's ``SimpleITKIO``. Out: ``{case_id: {class_name: dice}}``, the same
    structure as :func:`dice_per_case_from_summary`.
    """
    reader = SimpleITKIO()
    scores = {}
    for file_name in subfiles(pred_folder, suffix=file_ending, join=False):
        reference, _ = reader.read_seg(join(gt_folder, file_name))
        prediction, _ = reader.read_seg(join(pred_folder, file_name))
        scores[_case_id(file_name, file_ending)] = foreground_slice_dice(reference, prediction, labels)
    return scores


def usable_cases(values) -> np.ndarray:
    """The cases that enter a mean: (n_cases,) or (n_cases, n_classes) Dice in, (n_usable, n_classes) out,
    dropping the cases that are NaN for every class."""
    array = np.asarray(values, dtype=float)
    array = array[:, None] if array.ndim == 1 else array
    return array[~np.all(np.isnan(array), axis=1)]


def _statistic(samples: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over classes of the per-class NaN-excluding mean over cases.

    ``samples``: (n_classes, ..., n_cases), cases on ``axis`` (the last, as scipy's bootstrap passes them);
    out: shape (...,).
    """
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        return np.nanmean(np.nanmean(samples, axis=axis), axis=0)


def bootstrap_ci(values, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """Mean Dice with a percentile bootstrap confidence interval over cases.

    In: ``values`` of shape (n_cases,) for one class, or (n_cases, n_classes) for the mean over classes of a target
    domain (cases are resampled as whole rows, so classes of a case stay together). The statistic is the mean over
    classes of each class's mean over cases, NaN entries excluded (cases that are NaN for every class are dropped).
    Out: ``(mean, low, high)``, the (1 - alpha) interval from ``n_boot`` resamples drawn with ``seed``
    (deterministic). One case gives ``(v, v, v)``; no usable case gives ``(nan, nan, nan)``.
    """
    return stratified_bootstrap_ci([values], n_boot, alpha, seed)


def stratified_bootstrap_ci(groups: list, n_boot: int = 1000, alpha: float = 0.05,
                            seed: int = 0) -> tuple[float, float, float]:
    """Mean over groups (target domains) of :func:`bootstrap_ci`'s statistic, with a stratified bootstrap CI.

    In: one array per group, each shaped as ``values`` of :func:`bootstrap_ci`. Cases are resampled within each
    group, so every group keeps its weight: scipy's ``bootstrap`` with one sample per group (unpaired samples are
    resampled independently). Out: ``(mean, low, high)``; NaN when a group has no usable case.
    """
    groups = [usable_cases(group).T for group in groups]  # (n_classes, n_cases): scipy resamples the last axis
    if not groups or any(group.shape[-1] == 0 for group in groups):
        return float('nan'), float('nan'), float('nan')
    # scipy broadcasts the other axes: pad to one class count with all-NaN classes, which no mean counts.
    n_classes = max(len(group) for group in groups)
    groups = [np.pad(group, ((0, n_classes - len(group)), (0, 0)), constant_values=np.nan) for group in groups]
    mean = float(np.mean([_statistic(group) for group in groups]))
    # scipy needs two cases per sample; a one-case group's resamples are that case, so it adds a constant.
    resampled = [group for group in groups if group.shape[-1] > 1]
    constant = sum(float(_statistic(group)) for group in groups if group.shape[-1] == 1)
    if not resampled:
        return mean, mean, mean

    def statistic(*samples, axis=-1):
        return (sum(_statistic(sample, axis) for sample in samples) + constant) / len(groups)

    interval = bootstrap(resampled, statistic, n_resamples=n_boot, confidence_level=1 - alpha, method='percentile',
                         vectorized=True, axis=-1, rng=np.random.default_rng(seed)).confidence_interval
    return mean, float(interval.low), float(interval.high)
