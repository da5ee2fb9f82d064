"""Writing nnU-Net v2 raw datasets from public releases, safely and repeatably.

The converters (``convert_prostate``, ``convert_abdominal``) only know where a release keeps its
cases and how its labels map onto nnU-Net's; everything else lives here:

* one case = one single-channel image plus one label map, read with SimpleITK and written as
  ``imagesTr/<ID>_0000.nii.gz`` and ``labelsTr/<ID>.nii.gz`` (uint8). The label must share the
  image's geometry (size exactly; spacing, origin and direction within ``GEOMETRY_TOLERANCE``),
  and is then given the image's geometry verbatim so nnU-Net's own geometry check passes.
  Files shorter than their header promises are refused: ITK would read them without error.
* a dataset is written into a hidden ``.DatasetXXX_Name.partial-*`` folder next to its target
  and renamed into place only when complete, so an error or interrupt never leaves a
  half-written dataset that nnU-Net would pick up.
* ``MANIFEST_FILE`` records what a dataset was converted from (files and their SHA-256) and
  how (labels, channel names, label rule). A rerun on the same input finds an identical
  manifest and does nothing; anything else in the target folder is never replaced silently.
* nnU-Net identifies datasets by their three-digit id alone, so a folder with the same id but
  another name (in nnUNet_raw, or nnUNet_preprocessed / nnUNet_results where set) is refused.

Bad input raises ``ConversionError`` with a one-line message naming the case; ``run_converter``
turns it into that line on stderr and exit status 2.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import nibabel
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

from nnunetv2_desam.console import run_console_command
from nnunetv2_desam.errors import ConversionError
from nnunetv2_desam.networks.default_sam_checkpoint import file_sha256

FILE_ENDING = ".nii.gz"
MANIFEST_FILE = "desam_conversion.json"
MANIFEST_VERSION = 1
GEOMETRY_TOLERANCE = 1e-3
"""Largest accepted difference between image and label spacing (mm), origin (mm) and
direction cosines: enough for float32/float64 header round-off, far below a voxel."""

Log = Callable[[str], None]


class LabelRule(Protocol):
    """Turns a source label array into nnU-Net's consecutive labels, or raises ConversionError."""

    def __call__(self, array: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict:
        """JSON description recorded in the manifest, so a changed rule is not mistaken for an
        identical conversion."""


@dataclass(frozen=True)
class LabelMapping:
    """Maps each allowed source label value to an output label.

    Values missing from ``table`` are errors rather than background: a release with unexpected
    classes is more likely the wrong folder or a broken file than something to drop quietly.
    """

    table: Mapping[int, int]

    def __call__(self, array: np.ndarray) -> np.ndarray:
        values = np.unique(array)
        unknown = [v for v in values.tolist() if v not in self.table]
        if unknown:
            raise ConversionError(
                f"unknown label values {format_values(unknown)}; "
                f"expected a subset of {format_values(sorted(self.table))}")
        lookup = np.zeros(max(self.table) + 1, dtype=np.uint8)
        for source, target in self.table.items():
            lookup[source] = target
        return lookup[array.astype(np.int64)]

    def describe(self) -> dict:
        return {"map": {str(k): int(v) for k, v in sorted(self.table.items())}}


@dataclass(frozen=True)
class SourceCase:
    """One case of a release: where its files are and what nnU-Net will call it."""

    identifier: str
    image: Path
    label: Path
    source_name: str
    """How the release calls the case (shown in progress and error messages)."""

    def __str__(self) -> str:
        return f"{self.identifier} ({self.source_name})"


@dataclass(frozen=True)
class DatasetSpec:
    """What one output dataset is called and how its labels are produced."""

    dataset_id: int
    name: str
    channel_names: Mapping[str, str]
    labels: Mapping[str, int]
    label_rule: LabelRule
    dataset_json_extras: Mapping[str, str] = field(default_factory=dict)
    """Descriptive dataset.json fields (description, reference, licence) nnU-Net ignores."""

    @property
    def folder_name(self) -> str:
        return dataset_folder_name(self.dataset_id, self.name)


@dataclass(frozen=True)
class ConversionResult:
    """What happened to one dataset, for the summary line and for callers that go on to plan it."""

    dataset_name: str
    folder: Path
    num_cases: int
    status: str
    """One of "written", "replaced" or "up to date"."""


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name for a dataset, e.g. ``Dataset201_ProstateRUNMC``."""
    if not 1 <= dataset_id <= 999:
        raise ConversionError(f"dataset id {dataset_id} for {name} is outside nnU-Net's range 1-999")
    return f"Dataset{dataset_id:03d}_{name}"


def resolve_raw_folder(raw: str | os.PathLike | None) -> Path:
    """The nnUNet_raw folder: the explicit argument, else the environment variable."""
    raw = raw if raw is not None else os.environ.get("nnUNet_raw")
    if not raw:
        raise ConversionError("no output folder: pass --raw or set the nnUNet_raw environment variable")
    return Path(raw)


def nifti_stem(filename: str) -> str | None:
    """The file name without ``.nii``/``.nii.gz`` (any case), or None for non-NIfTI files."""
    match = re.fullmatch(r"(.+)\.nii(\.gz)?", filename, flags=re.IGNORECASE)
    return match.group(1) if match else None


def format_values(values: Sequence[float]) -> str:
    """Compact list for error messages: ``[0, 1, 255]``, ``[0, 0.5, 1]``."""
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def convert_datasets(jobs: Sequence[tuple[DatasetSpec, Sequence[SourceCase]]], input_root: Path,
                     raw_folder: Path, overwrite: bool = False, log: Log = print) -> list[ConversionResult]:
    """Write each (spec, cases) job as one nnU-Net raw dataset under ``raw_folder``.

    All jobs are checked (id clashes, existing folders, input files) before any is written,
    so a refusal for the last dataset does not leave the first ones converted. Paths in the
    manifest are relative to ``input_root`` so that moving the release does not count as a change.
    """
    plans = [(spec, cases, *_plan(spec, cases, input_root, raw_folder, overwrite)) for spec, cases in jobs]
    results = []
    for spec, cases, status, manifest in plans:
        folder = raw_folder / spec.folder_name
        if status == "up to date":
            log(f"{spec.folder_name}: up to date ({len(cases)} cases, same input), nothing to do")
        else:
            log(f"{spec.folder_name}: converting {len(cases)} cases into {folder}")
            _write_dataset(spec, cases, manifest, folder, log)
        results.append(ConversionResult(spec.folder_name, folder, len(cases), status))
    return results


def run_converter(prog: str, convert: Callable[[], list[ConversionResult]]) -> int:
    """Run a converter for a console script: a summary line on success; the exit status (a
    :class:`ConversionError` becomes one ``prog: error: ...`` line and status 2, no traceback)."""

    def convert_and_summarise() -> None:
        results = convert()
        summary = ", ".join(f"{r.dataset_name} ({r.num_cases} cases, {r.status})" for r in results)
        print(f"Done: {len(results)} dataset(s) in {results[0].folder.parent}: {summary}")

    return run_console_command(prog, convert_and_summarise)


def _plan(spec: DatasetSpec, cases: Sequence[SourceCase], input_root: Path, raw_folder: Path,
          overwrite: bool) -> tuple[str, dict]:
    """Decide whether a dataset must be written and build the manifest it would carry."""
    _check_id_is_unique(spec, raw_folder)
    manifest = _build_manifest(spec, cases, input_root)
    target = raw_folder / spec.folder_name
    if not target.exists():
        return "written", manifest
    problem = _how_it_differs(target, manifest, cases)
    if problem is None:
        return "up to date", manifest
    if not overwrite:
        raise ConversionError(f"{target} already exists and {problem}; use --overwrite to replace it")
    return "replaced", manifest


def _check_id_is_unique(spec: DatasetSpec, raw_folder: Path) -> None:
    """nnU-Net resolves a dataset by id alone and fails on two names for one id."""
    prefix = re.compile(rf"Dataset{spec.dataset_id:03d}_")
    roots = [raw_folder] + [Path(os.environ[v]) for v in ("nnUNet_preprocessed", "nnUNet_results")
                            if os.environ.get(v)]
    for root in roots:
        if not root.is_dir():
            continue
        for other in sorted(root.iterdir()):
            if other.is_dir() and prefix.match(other.name) and other.name != spec.folder_name:
                raise ConversionError(
                    f"cannot create {spec.folder_name}: {other} already uses id {spec.dataset_id} "
                    f"and nnU-Net needs unique ids; choose another id or remove that folder")


def _build_manifest(spec: DatasetSpec, cases: Sequence[SourceCase], input_root: Path) -> dict:
    return {
        "format_version": MANIFEST_VERSION,
        "dataset": spec.folder_name,
        "channel_names": dict(spec.channel_names),
        "labels": dict(spec.labels),
        "label_rule": spec.label_rule.describe(),
        "cases": {c.identifier: {"image": _describe_source(c, c.image, input_root),
                                 "label": _describe_source(c, c.label, input_root)} for c in cases},
    }


def _describe_source(case: SourceCase, path: Path, input_root: Path) -> dict:
    try:
        return {"file": path.relative_to(input_root).as_posix(), "size": path.stat().st_size,
                "sha256": _sha256(path)}
    except OSError as error:
        raise ConversionError(f"{case}: cannot read {path}: {error.strerror}") from None


def _sha256(path: Path) -> str:
    return file_sha256(str(path))


def _how_it_differs(target: Path, manifest: dict, cases: Sequence[SourceCase]) -> str | None:
    """None if ``target`` is this exact conversion, complete; else why it is not."""
    manifest_file = target / MANIFEST_FILE
    try:
        existing = json.loads(manifest_file.read_text())
    except (OSError, ValueError):
        return f"was not written by this converter (no readable {MANIFEST_FILE})"
    changed = [key for key in manifest if existing.get(key) != manifest[key]]
    if changed:
        return f"holds a different conversion (differs in: {', '.join(changed)})"
    missing = [p for p in _output_files(target, cases) if not p.is_file()]
    if missing:
        return f"is incomplete ({missing[0].relative_to(target)} is missing)"
    return None


def _output_files(folder: Path, cases: Sequence[SourceCase]) -> list[Path]:
    return [folder / "dataset.json"] + [p for c in cases for p in _case_paths(folder, c)]


def _case_paths(folder: Path, case: SourceCase) -> tuple[Path, Path]:
    return (folder / "imagesTr" / f"{case.identifier}_0000{FILE_ENDING}",
            folder / "labelsTr" / f"{case.identifier}{FILE_ENDING}")


def _write_dataset(spec: DatasetSpec, cases: Sequence[SourceCase], manifest: dict, target: Path,
                   log: Log) -> None:
    """Convert into a hidden sibling folder and rename it into place only once complete."""
    partial = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        (partial / "imagesTr").mkdir(parents=True)
        (partial / "labelsTr").mkdir()
        for index, case in enumerate(cases, start=1):
            log(f"[{index}/{len(cases)}] {case.source_name} -> {case.identifier}")
            write_case(case, spec.label_rule, partial)
        generate_dataset_json(str(partial), dict(spec.channel_names), dict(spec.labels), len(cases),
                              FILE_ENDING, dataset_name=spec.folder_name, **spec.dataset_json_extras)
        (partial / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        _move_into_place(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _move_into_place(partial: Path, target: Path) -> None:
    """Rename ``partial`` to ``target``; an existing target is moved aside first and deleted
    only once the new dataset is in place, and restored if the rename fails."""
    if not target.exists():
        partial.rename(target)
        return
    replaced = partial.with_name(partial.name.replace(".partial-", ".replaced-"))
    target.rename(replaced)
    try:
        partial.rename(target)
    except BaseException:
        replaced.rename(target)
        raise
    shutil.rmtree(replaced)


def write_case(case: SourceCase, label_rule: LabelRule, dataset_folder: Path) -> None:
    """Validate one case and write its image and uint8 label into ``dataset_folder``."""
    try:
        image = _read_image(case.image)
        label = _read_image(case.label)
        _check_same_geometry(image, label)
        label_array = label_rule(sitk.GetArrayViewFromImage(label))
    except ConversionError as error:
        raise ConversionError(f"{case}: {error}") from None
    out_label = sitk.GetImageFromArray(label_array.astype(np.uint8))
    out_label.CopyInformation(image)
    image_path, label_path = _case_paths(dataset_folder, case)
    sitk.WriteImage(image, str(image_path), True)
    sitk.WriteImage(out_label, str(label_path), True)


def _read_image(path: Path) -> sitk.Image:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or ["unknown error"]
        raise ConversionError(f"cannot read {path}: {lines[-1].removeprefix('sitk::ERROR: ')}") from None
    _check_not_truncated(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                              f"expected a single-channel image")
    return image


def _check_not_truncated(path: Path) -> None:
    """ITK reads a truncated NIfTI file (an interrupted download, say) without any error and
    makes up the missing voxels, so compare the data size with what the header promises."""
    try:
        proxy = nibabel.load(path).dataobj
        expected = proxy.offset + int(np.prod(proxy.shape)) * proxy.dtype.itemsize
        actual = _gunzipped_size(path) if path.name.lower().endswith(".gz") else path.stat().st_size
    except EOFError:
        raise ConversionError(f"cannot read {path}: truncated (the gzip stream ends early)") from None
    except (OSError, ImageFileError) as error:
        raise ConversionError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    if actual < expected:
        raise ConversionError(f"cannot read {path}: truncated ({actual} of {expected} bytes)")


def _gunzipped_size(path: Path) -> int:
    with gzip.open(path, "rb") as f:
        return sum(len(chunk) for chunk in iter(lambda: f.read(1 << 20), b""))


def _check_same_geometry(image: sitk.Image, label: sitk.Image) -> None:
    if image.GetSize() != label.GetSize():
        raise ConversionError(f"image/label geometry mismatch: size {image.GetSize()} vs {label.GetSize()}")
    for what in ("Spacing", "Origin", "Direction"):
        ours, theirs = getattr(image, f"Get{what}")(), getattr(label, f"Get{what}")()
        if not np.allclose(ours, theirs, rtol=0, atol=GEOMETRY_TOLERANCE):
            raise ConversionError(f"image/label geometry mismatch: {what.lower()} "
                                  f"{format_values(ours)} vs {format_values(theirs)}")
