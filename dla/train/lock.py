"""One training run per run directory: ``OUT_DIR/.lock`` holds the owner's pid and host.

The lock file is written whole under a temporary name and hard-linked into place (``os.link``
fails if the name exists), so no second run ever sees a half-written lock. A lock whose owner is
a process of this host that no longer exists is stale and is taken over; a lock from another host
cannot be checked and is reported with the way to remove it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from dla.errors import ConfigError

LOCK_FILE = ".lock"


def prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` (and check it can be written), or raise :class:`ConfigError`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir {out_dir} is a file, not a directory: choose another out_dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise ConfigError(f"out_dir {out_dir}: a part of the path is a file ({e.strerror})") from None
    except OSError as e:
        raise ConfigError(f"out_dir {out_dir} cannot be created: {e.strerror}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir {out_dir} is not writable: choose another out_dir")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory, released by :meth:`release` (or leaving a ``with``)."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_FILE
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.held = False

    def acquire(self) -> RunLock:
        tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.owner) + "\n")
        except OSError as e:
            raise ConfigError(f"out_dir {self.path.parent} is not writable: {e.strerror}") from None
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    pass
                owner = self._read_owner()
                if owner is None:  # vanished meanwhile, or unreadable: a stale leftover
                    self.path.unlink(missing_ok=True)
                    continue
                same_host = owner.get("host") == self.owner["host"]
                if same_host and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
                    self.path.unlink(missing_ok=True)  # its owner died without releasing it
                    continue
                where = f"pid {owner.get('pid')} on host {owner.get('host')}, since {owner.get('since')}"
                hint = ("wait for it to finish, or use another out_dir" if same_host else
                        f"if that run is no longer running, delete {self.path}")
                raise ConfigError(f"out_dir {self.path.parent} is in use by another dla train run ({where}): {hint}")
            raise ConfigError(f"could not take the lock {self.path}: another run keeps replacing it")
        finally:
            tmp.unlink(missing_ok=True)

    def _read_owner(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) else None

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = self._read_owner()
        if owner is not None and owner.get("pid") == self.owner["pid"] and owner.get("host") == self.owner["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
