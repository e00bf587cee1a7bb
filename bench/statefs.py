"""Owns: the filesystem a bench run's runtime state lives on — a tmpfs of its own, as /run is
on a normal host.

Every chain writes small files per pod and per call: the engine's and the sandboxer's state
(write-then-rename), OCI bundles, runc's state.json (the shim chain's runc root is put under
the run dir, see bench.engine.shim_controller), sockets.  On a normal host all of that is under
/run, a tmpfs.  On these machines /run is a plain directory of the root ext4 (mounted with
`discard`): each rename or unlink is journal work, and a run's teardown deletes thousands of
files, so the next journal commits stall metadata operations for seconds.  Measured on this
kind of machine (runc-seq then runc-c10 back to back, as `make validation` runs them): the
Python engines' engine.prepare took 4-13 ms for the first ~5 s of the c10 session and 1-2 ms
afterwards, and 0.3-0.8 ms throughout on a tmpfs; the sandbox chain's RunPodSandbox p95 at
c10 went from 180-255 ms (six 5-session sets) to 63-90 ms (five).  Those stalls belong to the
machine, not to either chain, so a run mounts a tmpfs on its own run dir and unmounts it at the
end (the run's leftover check sees a mount that outlives it).  Where mounting is not allowed
the run goes on, on the plain directory, and run.json says so (`run_dir_fs`).
"""
from __future__ import annotations

import os
from pathlib import Path

from bench.processes import unescape_mount
from bench.sandboxer import nspin
from bench.sandboxer.bundle import MS_NODEV, MS_NOSUID

MOUNTED = "tmpfs (mounted for the run)"


def filesystem_of(path: str | os.PathLike[str]) -> str:
    """The filesystem type of the mount that holds `path` (its longest mount-point prefix)."""
    target = os.path.realpath(path)
    best, fstype = "", "unknown"
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            mp = unescape_mount(left.split()[4])
            inside = target == mp or target.startswith(mp.rstrip("/") + "/")
            if inside and len(mp) >= len(best):
                best, fstype = mp, right.split()[0]
    return fstype


def mount_tmpfs(path: Path) -> str:
    """Put `path` (an empty directory) on a tmpfs of its own unless it already is on one.

    Returns what `path` is on afterwards, for run.json: MOUNTED, "tmpfs", or the other
    filesystem with the reason the mount failed.
    """
    fs = filesystem_of(path)
    if fs == "tmpfs":
        return "tmpfs"
    try:
        # mode 0755 like /run; nosuid/nodev like /run on a systemd host.  No size cap: the
        # run's state is a few MB (microVM snapshots live in the asset cache, not here).
        nspin.mount("tmpfs", str(path), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    except OSError as exc:
        return f"{fs} (tmpfs mount failed: {exc.strerror or exc})"
    return MOUNTED
