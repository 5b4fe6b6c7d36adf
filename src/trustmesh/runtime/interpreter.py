"""Which Python a sandboxed process (an app, a sidecar's agent) runs, as a non-root user.

Sandboxed processes run as their own uids, so the interpreter, its standard library,
trustmesh and its dependencies must be readable by any user. A Python installed under a
private home (pyenv in ``/root/.pyenv``, mode 0700) is not: then the distribution's
interpreter of the same version (``/usr/bin/python3.11``, ABI-compatible with the
virtualenv's compiled wheels) runs instead, with the virtualenv's site-packages and
trustmesh's source on ``PYTHONPATH``. When neither works the sandbox is unavailable and
the reason says which path is closed.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import trustmesh

__all__ = ["SandboxPython", "sandbox_python"]


@dataclass(frozen=True, slots=True)
class SandboxPython:
    """An interpreter every user can run, and the environment it needs."""

    executable: str
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, module: str, *args: str) -> list[str]:
        return [self.executable, "-m", module, *args]


def _closed(path: Path, *, want_exec: bool) -> Path | None:
    """The first component of ``path`` (resolved) another user cannot pass or read."""
    try:
        real = path.resolve(strict=True)
    except OSError:
        return path
    for parent in reversed(real.parents):
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            return parent
    mode = real.stat().st_mode
    needed = stat.S_IXOTH if want_exec or real.is_dir() else stat.S_IROTH
    if real.is_dir():
        needed |= stat.S_IROTH
    return None if mode & needed == needed else real


def _code_paths() -> list[Path]:
    package = Path(trustmesh.__file__).resolve().parent
    paths = {package.parent}
    for key in ("purelib", "platlib"):
        paths.add(Path(sysconfig.get_paths()[key]))
    return sorted(paths)


def sandbox_python() -> SandboxPython | str:
    """The interpreter for sandboxed processes, or why there is none."""
    for path in _code_paths():
        closed = _closed(path, want_exec=False)
        if closed is not None:
            return f"{closed} is not readable by other users (sandboxed processes need {path})"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if (
        _closed(Path(sys.executable), want_exec=True) is None
        and _closed(stdlib, want_exec=False) is None
    ):
        return SandboxPython(sys.executable)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [Path("/usr/bin") / version, Path("/usr/local/bin") / version]
    found = shutil.which(version)
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.exists() and _closed(candidate, want_exec=True) is None:
            env = {
                "PYTHONPATH": os.pathsep.join(str(p) for p in _code_paths()),
                "PYTHONNOUSERSITE": "1",
            }
            return SandboxPython(str(candidate), env)
    return (
        f"{sys.executable} is not runnable by other users and no {version} is "
        f"(Debian: apt-get install {version})"
    )
