"""Every way streampipe's supervisor side fails, in one tree.

    StreampipeError                 base; the CLI prints its message and exits with ``exit_code``
    ├── ConfigError                 services.yaml is wrong: file, line, field (exit 2)
    ├── ControlError                the control socket did not answer or refused (exit 1)
    │   ├── NotRunning              no supervisor owns this run directory (exit 1)
    │   └── UnsafeSocketDir         the socket folder is not ours alone, or not the one we made (exit 1)
    ├── AlreadyRunning              a live supervisor already owns this run directory (exit 1)
    ├── StageError                  a stage failed to start or to stop (exit 1)
    └── MissingExtra                an optional part is not installed: names the extra (exit 1)

Stage-side failures (a record that cannot be processed) are :class:`stages.api.BadRecord`
and never reach the supervisor as exceptions: they become dead letters and counters.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType


class StreampipeError(Exception):
    """Base of every error the CLI reports as a one-line message."""

    exit_code = 1


class ConfigError(StreampipeError):
    """A ``services.yaml`` that cannot run. Names the file, the line and the field."""

    exit_code = 2

    def __init__(self, message: str, *, file: Path | str | None = None, line: int | None = None, field: str | None = None) -> None:
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = str(file) if file is not None else "<config>"
        if line is not None:
            where += f":{line}"
        what = f" {field}:" if field else ""
        super().__init__(f"{where}:{what} {message}")


class ControlError(StreampipeError):
    """The supervisor's control socket did not answer, or answered with an error."""


class NotRunning(ControlError):
    """No supervisor is running for this run directory."""


class UnsafeSocketDir(ControlError):
    """The run directory's socket folder is not a 0700 folder of ours, or not the one it made."""


class AlreadyRunning(StreampipeError):
    """A live supervisor already owns this run directory."""


class StageError(StreampipeError):
    """A stage could not be started or stopped."""


class MissingExtra(StreampipeError):
    """An optional feature whose extra is not installed (e.g. matplotlib, for ``report``)."""


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` of the optional ``extra``, or say which extra ``feature`` needs."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{feature} needs {module}, which is not installed: "
                           f"pip install 'streampipe[{extra}]'") from None
