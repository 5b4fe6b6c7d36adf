"""Start one process inside a pod's sandbox: ``python -m trustmesh.runtime.podexec``.

What a container runtime does for each container, in the order that keeps it safe:

1. enter the pod's network namespace (``--netns NAME``, from ``/run/netns``);
2. with ``--hosts`` / ``--resolv``: a private mount namespace (nothing propagates back to
   the host) in which the pod's own files are bind-mounted read-only over /etc/hosts and
   /etc/resolv.conf — what ``ip netns exec`` does with /etc/netns/NAME;
3. with ``--hostname``: a private UTS namespace whose host name is the pod's name (what
   ``hostname`` and ``socket.gethostname()`` say in a pod);
4. with ``--uid``: drop every capability from the bounding set, clear supplementary
   groups, switch gid then uid (the kernel clears the permitted and effective
   capabilities on the switch away from root), so the process cannot change its
   namespace's routes or nftables rules (EPERM) nor gain privileges back;
5. ``no_new_privs`` (set-uid binaries and file capabilities grant nothing);
6. ``exec`` the command (``--cwd`` first).

Kept to the standard library and ctypes (no pyroute2 import): a mesh starts several of
these per pod and Python's import time is most of their cost. Python 3.11 has neither
``os.setns`` nor ``os.unshare``, hence the libc calls.

Usage: ``podexec --netns tm-ab12-3 [--hosts F --resolv F] [--hostname H] [--uid U --gid G]
[--cwd D] -- COMMAND ARGS...``; exit status 126 with a message on stderr when the sandbox cannot be
entered (the command never runs outside it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["main", "podexec_argv"]

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
NETNS_DIR = "/run/netns"
SANDBOX_FAILED = 126


def podexec_argv(
    python: str,
    netns: str,
    command: list[str],
    *,
    uid: int | None = None,
    gid: int | None = None,
    hosts: str | None = None,
    resolv: str | None = None,
    cwd: str | None = None,
    hostname: str | None = None,
) -> list[str]:
    """The argv that runs ``command`` in the sandbox (built in one place, parsed below)."""
    argv = [python, "-m", "trustmesh.runtime.podexec", "--netns", netns]
    for flag, value in (("--uid", uid), ("--gid", gid), ("--hosts", hosts), ("--resolv", resolv)):
        if value is not None:
            argv += [flag, str(value)]
    if cwd is not None:
        argv += ["--cwd", cwd]
    if hostname is not None:
        argv += ["--hostname", hostname]
    return [*argv, "--", *command]


class _Fail(Exception):
    pass


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise _Fail(f"{what}: {os.strerror(code)}")


def _parse(args: list[str]) -> tuple[dict[str, str], list[str]]:
    if "--" not in args:
        raise _Fail("usage: podexec --netns NAME [options] -- COMMAND ...")
    split = args.index("--")
    options, command = args[:split], args[split + 1 :]
    known = {"--netns", "--uid", "--gid", "--hosts", "--resolv", "--cwd", "--hostname"}
    parsed: dict[str, str] = {}
    if len(options) % 2:
        raise _Fail(f"options come in pairs: {options}")
    for flag, value in zip(options[::2], options[1::2], strict=True):
        if flag not in known:
            raise _Fail(f"unknown option {flag}")
        parsed[flag[2:]] = value
    if "netns" not in parsed or not command:
        raise _Fail("--netns and a command are required")
    return parsed, command


def enter(options: dict[str, str]) -> None:
    """Steps 1-4 for the current (single-threaded) process."""
    libc = _libc()
    name = options["netns"]
    if "/" in name or name in (".", ".."):
        raise _Fail(f"bad namespace name {name!r}")
    try:
        fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    except OSError as exc:
        raise _Fail(f"network namespace {name}: {exc.strerror}") from None
    try:
        _check(libc.setns(fd, CLONE_NEWNET), f"entering network namespace {name}")
    finally:
        os.close(fd)
    mounts = [
        (options[k], target)
        for k, target in (("hosts", "/etc/hosts"), ("resolv", "/etc/resolv.conf"))
        if k in options
    ]
    if mounts:
        _check(libc.unshare(CLONE_NEWNS), "unshare(mount namespace)")
        _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
        for source, target in mounts:
            src, dst = source.encode(), target.encode()
            _check(libc.mount(src, dst, None, MS_BIND, None), f"bind {source} on {target}")
            flags = MS_BIND | MS_REMOUNT | MS_RDONLY
            _check(libc.mount(src, dst, None, flags, None), f"read-only {target}")
    if "hostname" in options:
        host = options["hostname"].encode()
        _check(libc.unshare(CLONE_NEWUTS), "unshare(UTS namespace)")
        _check(libc.sethostname(host, len(host)), f"host name {options['hostname']}")
    if "uid" in options:
        uid = int(options["uid"])
        gid = int(options.get("gid", uid))
        last_cap = int(open("/proc/sys/kernel/cap_last_cap").read())  # noqa: SIM115
        for cap in range(last_cap + 1):
            _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap}")
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        # The switch away from uid 0 cleared the permitted and effective sets; check it.
        status = open("/proc/self/status").read()  # noqa: SIM115
        effective = next(line for line in status.splitlines() if line.startswith("CapEff:"))
        if int(effective.split()[1], 16) != 0:
            raise _Fail(f"capabilities left after dropping to uid {uid}: {effective}")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if "cwd" in options:
        os.chdir(options["cwd"])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        options, command = _parse(args)
        enter(options)
    except (_Fail, OSError, ValueError) as exc:
        print(f"podexec: {exc}", file=sys.stderr, flush=True)
        return SANDBOX_FAILED
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"podexec: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr, flush=True)
        return SANDBOX_FAILED
    return SANDBOX_FAILED  # not reached: exec replaces this process


if __name__ == "__main__":
    sys.exit(main())
