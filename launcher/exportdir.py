"""Writing an export's files into a folder the user names (``export kubernetes -o``, ``export systemd -o``)."""

from __future__ import annotations

from pathlib import Path


def write_export(folder: Path, files: dict[str, str], pattern: str, marker: str) -> tuple[list[Path], list[Path]]:
    """Write ``files`` (name -> text) in ``folder`` (created); returns the paths written and the stale ones removed.

    A file matching ``pattern`` that an earlier export wrote there (it holds ``marker``) and this
    one does not (a stage renamed, scaled down or left out) is removed, so that applying the folder
    does not bring it back; other files are left alone.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in files]
    stale = [p for p in sorted(folder.glob(pattern)) if p not in paths and marker in p.read_text(errors="replace")]
    for path in stale:
        path.unlink()
    for path, text in zip(paths, files.values()):
        path.write_text(text)
    return paths, stale
