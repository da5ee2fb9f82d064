"""The rows of the cross-domain tables: one registry of methods, and the trainer classes behind them.

A :class:`Method` is a row of the paper's tables: its name there, the nnU-Net trainer class that
trains it and the tables it is a row of (:data:`TABLE_ROWS` keeps the paper's order). A trainer
written later becomes a row with one :data:`METHODS` entry. What the experiment needs to know about a
trainer is read off its class, not kept in the registry:

* :func:`needs_sam_checkpoint`: a DeSAM trainer, or a class with ``requires_sam_checkpoint = True``
* :func:`uses_point_grid`: ``DESAM_GRID_SIZE`` changes its predictions (``desam_settings`` with point
  prompts through PRIM), or a class with ``uses_point_grid = True``
* :func:`honours_budget`: it reads ``DESAM_EPOCHS`` and friends (a subclass of ``nnUNetTrainerBudget``
  or a DeSAM trainer), or a class with ``honours_desam_budget = True``
"""
from __future__ import annotations

import importlib
import io
import pkgutil
from contextlib import redirect_stdout
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

from nnunetv2_desam import trainers as trainers_package
from nnunetv2_desam.errors import ExperimentError
from nnunetv2_desam.trainers.nnUNetTrainerBudget import nnUNetTrainerBudget
from nnunetv2_desam.trainers.nnUNetTrainerDeSAM import nnUNetTrainerDeSAM

BASELINE = "nnUNetTrainer"
BUDGET_BASELINE = "nnUNetTrainerBudget"
DESAM_B = "nnUNetTrainerDeSAM_Box"
DESAM_P = "nnUNetTrainerDeSAM"


@dataclass(frozen=True)
class Method:
    """One row: ``key`` names it on the command line (``--methods``), ``name`` is the paper's row name.

    ``budget_trainer`` is the class trained instead of ``trainer`` when a budget is given (the baseline:
    nnU-Net's own trainer ignores ``DESAM_EPOCHS``).
    """

    key: str
    name: str
    trainer: str
    budget_trainer: str | None = None

    def trainer_for(self, budget: bool) -> str:
        return self.budget_trainer if budget and self.budget_trainer else self.trainer


UPPER_BOUND = Method("upper-bound", "Upper bound", BASELINE, BUDGET_BASELINE)
"""Not a trainer of its own: the baseline trained on each target's own 9:1 split (``--upper-bound``)."""

METHODS = {method.key: method for method in (
    UPPER_BOUND,
    Method("baseline", "Baseline", BASELINE, BUDGET_BASELINE),
    Method("advbias", "AdvBias", "nnUNetTrainerAdvBias"),
    Method("randconv", "RandConv", "nnUNetTrainerRandConv"),
    Method("maxstyle", "MaxStyle", "nnUNetTrainerMaxStyle"),
    Method("csdg", "CSDG", "nnUNetTrainerCSDG"),
    Method("medsam", "MedSAM", "nnUNetTrainerMedSAM"),
    Method("samed", "SAMed", "nnUNetTrainerSAMed"),
    Method("desam-b", "DeSAM-B", DESAM_B),
    Method("desam-p", "DeSAM-P", DESAM_P),
    Method("pdmm-only", "PDMM only", "nnUNetTrainerDeSAM_PDMMOnly"),
    Method("no-iou-head", "no IoU head", "nnUNetTrainerDeSAM_NoIoUHead"),
    Method("no-mef", "no MEF", "nnUNetTrainerDeSAM_NoMEF"),
)}

TABLE_ROWS = {
    "table2": ("upper-bound", "baseline", "advbias", "randconv", "maxstyle", "csdg", "medsam", "samed",
               "desam-b", "desam-p"),
    "table1": ("pdmm-only", "no-iou-head", "no-mef", "desam-p"),  # settings 1-4
}
"""The paper's tables, rows in the paper's order (Table 1: the ablations, setting 4 is DeSAM-P)."""

DEFAULT_ROWS = ("baseline", "desam-b", "desam-p")
ABLATION_ROWS = TABLE_ROWS["table1"][:-1]


def paper_name(trainer: str) -> str:
    """The paper's row name of a trainer class (its class name when it has none)."""
    names = {name: method.name for method in METHODS.values() if method is not UPPER_BOUND
             for name in (method.trainer, method.budget_trainer) if name}
    return names.get(trainer, trainer)


def display_names(names: Sequence[str], short) -> dict[str, str]:
    """``{name: short(name)}`` for tables and figures (the paper's "DeSAM-P", "SiteB"); a short name two
    names would share falls back to the full name. The report's notes map them back."""
    shorts = [short(name) for name in names]
    return {name: abbreviation if shorts.count(abbreviation) == 1 else name for name, abbreviation in zip(names, shorts)}


def select_methods(requested: Sequence[str]) -> list[tuple[Method, bool]]:
    """``--methods``: method keys and table names (``table2``, ``table1``), case-insensitive -> ``(method, named)``
    in order without repeats; ``named`` is False for a row that only came with a table. Unknown names are refused."""
    rows: dict[Method, bool] = {}
    for item in requested:
        key = item.lower()
        if key in TABLE_ROWS:
            for row in TABLE_ROWS[key]:
                rows.setdefault(METHODS[row], False)
        elif key in METHODS:
            rows[METHODS[key]] = True
        else:
            raise ExperimentError(f"unknown method {item!r}; known: {', '.join([*TABLE_ROWS, *METHODS])}")
    return list(rows.items())


@lru_cache(maxsize=None)
def package_trainer_classes() -> dict[str, type]:
    """``{name: class}`` of every nnU-Net trainer in ``nnunetv2_desam.trainers``, imported under the package's name
    (nnU-Net's own search imports them as top-level modules, whose classes are other objects)."""
    classes = {}
    for module_info in pkgutil.iter_modules(trainers_package.__path__):
        module = importlib.import_module(f"{trainers_package.__name__}.{module_info.name}")
        classes.update({name: value for name, value in vars(module).items()
                        if isinstance(value, type) and issubclass(value, nnUNetTrainer) and value is not nnUNetTrainer})
    return classes


def find_trainer_class(trainer: str) -> type | None:
    """The trainer class as nnU-Net's commands will find it: this package, nnunetv2, then the folders of
    ``nnUNet_extTrainer`` (read from ``os.environ``, as nnU-Net does); None when it is not installed. nnU-Net's
    report of its search is not printed."""
    cls = package_trainer_classes().get(trainer)
    if cls is not None:
        return cls
    try:
        with redirect_stdout(io.StringIO()):
            return recursive_find_trainer_class_by_name(trainer)
    except RuntimeError:
        return None


def needs_sam_checkpoint(cls: type) -> bool:
    return getattr(cls, "requires_sam_checkpoint", issubclass(cls, nnUNetTrainerDeSAM))


def uses_point_grid(cls: type | None) -> bool:
    """Whether ``DESAM_GRID_SIZE`` changes this trainer's predictions (point prompts through PRIM)."""
    settings = getattr(cls, "desam_settings", None)
    derived = settings is not None and settings.prompt_mode == "points" and settings.use_prim
    return getattr(cls, "uses_point_grid", derived)


def honours_budget(cls: type) -> bool:
    return getattr(cls, "honours_desam_budget", issubclass(cls, (nnUNetTrainerBudget, nnUNetTrainerDeSAM)))
