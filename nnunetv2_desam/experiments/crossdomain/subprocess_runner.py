"""Running one nnU-Net console command as a step: everything it prints goes to the step's log file, the
console gets the per-epoch lines of a training, and on failure the log's last lines.

nnU-Net's commands print a lot that a reader of the experiment's progress does not need (the full plans,
the citation banner, the same warning in every subprocess); the log keeps it all.
"""
from __future__ import annotations

import codecs
import re
import shlex
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Callable, Mapping, Sequence

from nnunetv2_desam.errors import ExperimentError, StepFailed

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?: ")
"""nnUNetTrainer.print_to_log_file's prefix."""
SHOWN = re.compile(r"(Epoch \d+ *$|train_loss |val_loss |Pseudo dice |Epoch time: |Yayy! New best |Training done\.|"
                   r"Mean Validation Dice: )")
"""What the console shows of a subprocess: nnU-Net's per-epoch lines and the end of a training."""
TAIL_LINES = 30


def console_line(line: str) -> str | None:
    """The console's version of one output line (without its timestamp), None for a line only the log keeps."""
    message = TIMESTAMP.sub("", line.rstrip())
    return f"    {message}" if SHOWN.match(message) else None


def stream_lines(stream, log, show: Callable[[str], None]) -> deque:
    """Copy ``stream`` (bytes) to ``log`` as it comes, pass every complete line to ``show``; returns the last
    :data:`TAIL_LINES` lines."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tail, pending = deque(maxlen=TAIL_LINES), ""
    for chunk in iter(lambda: stream.read1(65536), b""):
        log.write(chunk)
        log.flush()
        *lines, pending = (pending + decoder.decode(chunk)).split("\n")
        for line in lines:
            tail.append(line)
            show(line)
    if pending:
        tail.append(pending)
        show(pending)
    return tail


def print_console_line(line: str) -> None:
    shown = console_line(line)
    if shown is not None:
        print(shown, flush=True)


def run_logged(title: str, command: Sequence[str], log_file: Path, environment: Mapping[str, str],
               extra_environment: Mapping[str, str] | None = None) -> None:
    """Run a console command with ``environment`` (plus ``extra_environment``, shown with the command): its
    whole output goes to ``log_file``, the console gets :func:`console_line`'s selection; StepFailed naming the
    step ``title``, the command and the log, after the log's last lines, if it fails."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    extra_environment = dict(extra_environment or {})
    shown = " ".join([*(f"{name}={value}" for name, value in extra_environment.items()), shlex.join(command)])
    print(f"  $ {shown}\n  (log: {log_file})", flush=True)
    with open(log_file, "wb") as log:
        log.write(f"$ {shown}\n".encode())
        with subprocess.Popen([console_script(command[0]), *command[1:]], env={**environment, **extra_environment},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
            try:
                tail = stream_lines(process.stdout, log, print_console_line)
            except KeyboardInterrupt:  # a terminal's Ctrl-C reaches the child too; a plain SIGINT does not
                process.terminate()
                process.wait()
                raise
    if process.returncode != 0:
        print(f"  last lines of {log_file}:\n" + "\n".join(f"  | {line}" for line in tail), flush=True)
        raise StepFailed(f"step '{title}' failed with exit status {process.returncode}; command: {shown}; "
                         f"full output in {log_file}")


def console_script(name: str) -> str:
    """The console script beside this Python (an unactivated venv), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise ExperimentError(f"{name} not found next to {sys.executable} or on PATH: is nnunetv2 installed?")
    return found
