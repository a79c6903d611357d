"""A container's start, as a container runtime does it: ``python podinit.py SPEC_JSON``.

Run as root by :mod:`tests.kubelet` inside the pod's network namespace and fresh UTS and mount
namespaces (``ip netns exec NS unshare --uts --mount --propagation private``), it

1. sets the host name (the pod's name: ``run-stage`` takes its replica from the ordinal);
2. builds the container's root filesystem: an overlay whose lower layer is the machine's ``/``
   (the "image": the interpreter and streampipe), whose upper layer is a tmpfs of this container
   alone, with the image's own files copied in (``/pipeline``), the machine's ``/proc``, ``/dev``,
   ``/sys`` and the namespace's ``/etc/hosts`` bound in, and the pod's volumes bound at their
   mount paths (read-only where the manifest says so); nothing is written to the machine's ``/``;
3. makes that root read-only (``readOnlyRootFilesystem``), enters it (chroot) and its working dir;
4. drops to the pod's user, group and supplementary groups (``runAsUser``, ``runAsGroup``,
   ``fsGroup``), with ``no_new_privs`` (``allowPrivilegeEscalation: false``);
5. execs the container's command with its environment: the process keeps this pid, so the
   kubelet's ``Popen`` is the container's main process. A command that cannot be executed (not
   on the image's PATH, as a virtualenv hidden below a volume would be) exits 128 with a
   runtime's ``StartError`` line, as ``kubectl describe pod`` shows it.

Standard library only: it runs before the container's interpreter exists as such.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

PR_SET_NO_NEW_PRIVS = 38
START_ERROR_EXIT = 128      # a container whose command cannot be executed (containerd's StartError)


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def inside(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def mount_point(target: Path, file: bool) -> None:
    """Create what a mount needs at ``target`` (in the overlay's upper layer, never the machine's)."""
    if file:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.touch()
    else:
        target.mkdir(parents=True, exist_ok=True)


def traversable(root: Path, path: str) -> None:
    """Let any user pass through every folder above ``path`` (the image's interpreter is readable by
    its user; here it may sit under root's 0700 home: changed in this container's layer only)."""
    for folder in [*reversed(Path(path).parents), Path(path)]:
        where = inside(root, str(folder))
        if where.is_dir() and not where.is_symlink():
            mode = where.stat().st_mode
            if not mode & stat.S_IXOTH:
                where.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def build_root(spec: dict[str, Any]) -> Path:
    scratch = Path(spec["scratch"])
    mount("-t", "tmpfs", "-o", "mode=0700", "tmpfs", str(scratch))
    upper, work, root = scratch / "upper", scratch / "work", scratch / "root"
    for d in (upper, work, root):
        d.mkdir()
    mount("-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={upper},workdir={work}", str(root))
    for system in ("/proc", "/dev", "/sys"):
        mount("--rbind", system, str(inside(root, system)))
    mount("--bind", "/etc/hosts", str(inside(root, "/etc/hosts")))     # the namespace's: `ip netns exec` bound it
    for path, source in spec["image_files"].items():                   # the image's layers of its own
        target = inside(root, path)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target, symlinks=True)
    for path in spec["traversable"]:
        traversable(root, path)
    for m in sorted(spec["mounts"], key=lambda m: m["path"].count("/")):   # parents before children, as runtimes do
        target = inside(root, m["path"])
        mount_point(target, m["file"])
        mount("--bind", m["source"], str(target))
        if m["read_only"]:
            mount("-o", "remount,bind,ro", str(target))
    for path in spec.get("image_paths", []):
        keep_visible(root, path, [m["path"] for m in spec["mounts"]])
    if spec["read_only_root"]:
        mount("-o", "remount,bind,ro", str(root))
    return root


def keep_visible(root: Path, path: str, mounted: list[str]) -> None:
    """The image's interpreter and streampipe stay where they are even under a pod's volume: here
    the image is the machine's root, so a virtualenv under ``/tmp`` would vanish below the pod's
    ``emptyDir`` at ``/tmp``, as it never does in a real image. Bound back in, read-only."""
    if not any(Path(path).is_relative_to(m) for m in mounted) or not os.path.exists(path):
        return
    target = inside(root, path)
    mount_point(target, os.path.isfile(path))
    mount("--bind", path, str(target))
    mount("-o", "remount,bind,ro", str(target))


def drop_privileges(spec: dict[str, Any]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if spec["no_new_privs"] and libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    os.setgroups(spec["groups"])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])      # from root to another user: every capability goes with it


def main(argv: list[str]) -> None:
    spec = json.loads(argv[1])
    socket.sethostname(spec["hostname"])
    root = build_root(spec)
    os.chroot(root)
    os.chdir(spec["workdir"])
    drop_privileges(spec)
    try:
        os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
    except OSError as exc:   # as a runtime reports it: the container's last state says StartError, exit 128
        where = "executable file not found in $PATH" if isinstance(exc, FileNotFoundError) else exc.strerror
        print(f"StartError: exec: {spec['argv'][0]!r}: {where} (PATH={spec['env'].get('PATH', '')})", file=sys.stderr, flush=True)
        os._exit(START_ERROR_EXIT)


if __name__ == "__main__":
    main(sys.argv)
