"""A sink never cuts or appends to a file it did not write.

The consumer recovers its output after a crash by cutting a torn last line and re-reading the
lines after its saved offset. That is right for its own file and ruinous for anyone else's (an
``output:`` pointing at a notes file was cut at its last newline, then appended to). So the
sink records which file it writes, its device and inode, in its saved state (``"file"``), and
before it opens an existing, non-empty output it checks that the file is that one: a file it
has no record of, or another file now under that name, is refused with :class:`NotOurs` (the
stage fails to start, with the reason in ``status``) and is left untouched.

>>> import tempfile
>>> d = Path(tempfile.mkdtemp()); f = d / "out.jsonl"
>>> check_ours(f, None)                   # absent: ours to create
>>> _ = f.write_bytes(b"someone else's notes\\n")
>>> try:
...     check_ours(f, None)
... except NotOurs as exc:
...     print(exc)
refusing to write ...out.jsonl: it exists (21 bytes) and this sink has no record of writing it; ...
>>> check_ours(f, {"path": str(f), "offset": 21, "file": identity(os.stat(f))})   # the file it recorded
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class NotOurs(RuntimeError):
    """An existing output that this sink did not write (or that was replaced since)."""


def identity(st: os.stat_result) -> list[int]:
    """What names one file whatever its name: [device, inode]."""
    return [st.st_dev, st.st_ino]


def check_ours(path: Path, saved: dict[str, Any] | None) -> None:
    """Raise :class:`NotOurs` unless ``path`` is absent, empty, or the file ``saved`` records.

    ``saved``: the sink's saved state for this path (None when it has none). A state written
    before files were recorded (no ``"file"``) vouches by its path alone.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if st.st_size == 0:
        return
    if saved is None or saved.get("path") != str(path):
        raise NotOurs(f"refusing to write {path}: it exists ({st.st_size} bytes) and this sink has no record of writing it; "
                      f"move it away or choose another output (a sink cuts a torn last line of its own file)")
    recorded = saved.get("file")
    if recorded is not None and list(recorded) != identity(st):
        raise NotOurs(f"refusing to write {path}: it is not the file this sink wrote (that was device/inode "
                      f"{recorded[0]}/{recorded[1]}, this is {st.st_dev}/{st.st_ino}); move it away or choose another output")
