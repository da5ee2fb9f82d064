"""Where the package's exceptions become one-line messages: console entry points and nnU-Net's own commands."""

import sys
from typing import Callable

from nnunetv2_desam.errors import DeSAMError

INTERRUPTED_STATUS = 130


def run_console_command(prog: str, run: Callable[[], object], interrupted_hint: str = "") -> int:
    """Run ``run``; a :class:`DeSAMError` becomes ``prog: error: message`` on stderr and its exit status."""
    try:
        run()
    except DeSAMError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted{'; ' + interrupted_hint if interrupted_hint else ''}", file=sys.stderr)
        return INTERRUPTED_STATUS
    return 0


def _print_desam_errors_in_one_line(exc_type, exc, tb, previous_hook=sys.__excepthook__):
    if issubclass(exc_type, DeSAMError):
        print(f"nnunetv2-desam: error: {exc}", file=sys.stderr)
    else:
        previous_hook(exc_type, exc, tb)


def report_desam_errors_in_one_line() -> None:
    """Make an uncaught :class:`DeSAMError` print one line instead of a traceback (exit status stays 1).

    nnU-Net's own commands (``nnUNetv2_train``, ``nnUNetv2_predict``) build our trainers and networks
    and do not catch our exceptions; :mod:`~nnunetv2_desam.trainer_search_path` installs this at the
    start of those commands only. Other exceptions keep the hook that was there before.
    """
    if getattr(sys.excepthook, "__wrapped_desam__", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        _print_desam_errors_in_one_line(exc_type, exc, tb, previous)

    hook.__wrapped_desam__ = True
    sys.excepthook = hook
