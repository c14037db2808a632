"""A pass-through FUSE filesystem whose writes can stall, as a disk's do: the benchmark's stand-in
for a disk that stops answering for a few hundred milliseconds (bench/stall.py).

Every file operation goes to a directory underneath. While a stall is on, ``write``, ``fsync``
and ``truncate`` (what SQLite's WAL and checkpoints call) wait until it is over; reads and
metadata go on. Without ``writeback_cache`` FUSE sends each ``write()`` to this process as it
happens, so a caller's ``write()`` blocks for the stall as it would on a stalled disk.

Stalls come every ``--every-s`` seconds and last ``--stall-ms`` while the file ``--control``
holds ``on`` (checked at every period), so one mount serves runs with and without them. Each
stall is logged on stdout as it starts (``stalling <monotonic start>``) and as it ends (``stall
<monotonic start> <seconds>``).

    python -m bench.stallfs UNDER MOUNTPOINT --control FILE [--stall-ms 300] [--every-s 2]

Needs ``/dev/fuse`` and ``fusermount3`` (Debian's ``fuse3``) and ``mfusepy`` (requirements-dev.txt).
SIGTERM or SIGINT unmounts.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import mfusepy as fuse


class Stalls:
    """On/off gate that writes wait at; a thread turns it on for ``stall_s`` every ``every_s``."""

    def __init__(self, control: Path, stall_s: float, every_s: float) -> None:
        self.control, self.stall_s, self.every_s = control, stall_s, every_s
        self._open = threading.Event()
        self._open.set()
        self.count = 0

    def wait(self) -> None:
        self._open.wait()

    def run(self) -> None:
        while True:
            time.sleep(self.every_s)
            try:
                on = self.control.read_text().strip() == "on"
            except OSError:
                on = False
            if not on:
                continue
            started = time.monotonic()
            self._open.clear()
            print(f"stalling {started:.3f}", flush=True)
            time.sleep(self.stall_s)
            self._open.set()
            self.count += 1
            print(f"stall {started:.3f} {time.monotonic() - started:.3f}", flush=True)


class StallFS(fuse.Operations):
    use_ns = True

    def __init__(self, root: Path, stalls: Stalls) -> None:
        self.root = root
        self.stalls = stalls

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    # -- metadata -------------------------------------------------------------------------------
    def access(self, path: str, amode: int) -> int:
        if not os.access(self._path(path), amode):
            raise fuse.FuseOSError(errno.EACCES)
        return 0

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        st = os.fstat(fh) if fh is not None else os.lstat(self._path(path))
        keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_ino")
        attrs = {k: getattr(st, k) for k in keys}
        for k in ("st_atime", "st_mtime", "st_ctime"):
            attrs[k] = attrs.pop(k + "_ns")
        return attrs

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", *os.listdir(self._path(path))]

    def statfs(self, path: str) -> dict[str, Any]:
        st = os.statvfs(self._path(path))
        return {k: getattr(st, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files",
                                            "f_flag", "f_frsize", "f_namemax")}

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._path(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._path(path), uid, gid)

    def utimens(self, path: str, times: Any = None) -> None:
        os.utime(self._path(path), ns=times)

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._path(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._path(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._path(path))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._path(old), self._path(new))

    # -- files ----------------------------------------------------------------------------------
    def open(self, path: str, flags: int) -> int:
        return os.open(self._path(path), flags)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        return os.open(self._path(path), os.O_RDWR | os.O_CREAT, mode)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self.stalls.wait()
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: Any = None) -> None:
        self.stalls.wait()
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._path(path), length)

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        self.stalls.wait()
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    def flush(self, path: str, fh: int) -> None:
        return None

    def release(self, path: str, fh: int) -> None:
        os.close(fh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("under", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--control", type=Path, required=True, help="stalls happen while this file holds 'on'")
    parser.add_argument("--stall-ms", type=float, default=300.0)
    parser.add_argument("--every-s", type=float, default=2.0)
    args = parser.parse_args()
    stalls = Stalls(args.control, args.stall_ms / 1000, args.every_s)
    threading.Thread(target=stalls.run, name="stalls", daemon=True).start()
    print("mounting", flush=True)
    try:
        fuse.FUSE(StallFS(args.under.resolve(), stalls), str(args.mountpoint), foreground=True, nothreads=False)
    except RuntimeError as exc:
        sys.exit(f"stallfs: {exc}")


if __name__ == "__main__":
    main()
