"""The package's exceptions: one hierarchy, each message one line a user can act on.

Library code raises these (never ``SystemExit``), so an ``nnUNetPredictor`` embedded in a service
sees an ordinary exception. Only the console entry points turn them into a one-line message and an
exit status (:mod:`nnunetv2_desam.console`).
"""


class DeSAMError(Exception):
    """Base class: a problem the user can fix; ``exit_status`` is what a console command returns."""

    exit_status = 2


class ConfigurationError(DeSAMError):
    """An environment variable, option or dataset property this package cannot work with."""


class SAMCheckpointError(DeSAMError, ValueError):
    """A SAM checkpoint that is missing, unreadable, not in the official layout, or not the one a model was trained with."""


class ExperimentError(DeSAMError):
    """A cross-domain experiment (or the demo) that cannot run as asked; found before anything runs."""


class ConversionError(DeSAMError):
    """Bad input to a dataset converter, or an output folder it refuses to replace."""


class SplitError(DeSAMError):
    """A train / in-domain validation split that cannot be made, or would replace a different one."""


class StepFailed(DeSAMError):
    """A subprocess step of an experiment failed; the message names the step, the command and its log."""

    exit_status = 1
