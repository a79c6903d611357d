"""Process titles: what ``ps``, ``top`` and ``htop`` show for each streampipe process.

Every process of a pipeline is named after its role, so ``ps -o args`` reads as the pipeline
does rather than as a column of ``python3 -m ...`` lines::

    streampipe: supervisor [demo]
    streampipe: fork-server [demo]
    streampipe: normalizer.1 [demo]     (stage name, replica)

It uses ``setproctitle``, as supervisord, gunicorn and celery do: it rewrites the process's
argv area (``/proc/PID/cmdline``) and its thread name (``/proc/PID/comm``). The title still
starts with ``streampipe``, which is what the run directory's pid check looks for.
"""

from __future__ import annotations

from setproctitle import setproctitle


def title(role: str, pipeline: str) -> str:
    """The title of a process with ``role`` in ``pipeline``.

    >>> title("normalizer.1", "demo")
    'streampipe: normalizer.1 [demo]'
    """
    return f"streampipe: {role} [{pipeline}]"


def starting(ident: str) -> str:
    """The role of a replica's process before it holds the replica's lock (stages/fence.py): only
    the process that holds it is named after the replica, so ``ps`` never shows two of one
    replica, even while a late fork of a spawn that timed out finds the lock taken and exits.

    >>> title(starting("consumer.0"), "demo")
    'streampipe: consumer.0 (starting) [demo]'
    """
    return f"{ident} (starting)"


def set_title(role: str, pipeline: str) -> None:
    """Name this process ``streampipe: ROLE [PIPELINE]`` (see :func:`title`)."""
    setproctitle(title(role, pipeline))
