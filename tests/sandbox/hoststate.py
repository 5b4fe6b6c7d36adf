"""What a sandbox could leave behind on the host, to compare before and after."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


def host_state(mesh_id: str) -> dict[str, object]:
    """The mesh's namespaces, the host's links and nftables tables, mounts that name the
    mesh or cover /etc, and the mesh's runtime directory."""
    points = [line.split(" ")[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return {
        "netns": sorted(n for n in _run("ip", "netns", "list").split() if mesh_id in n),
        "links": sorted(
            line.split(":")[1].strip() for line in _run("ip", "-o", "link").splitlines()
        ),
        "nft": _run("nft", "list", "tables"),
        "mounts": sorted(p for p in points if mesh_id in p or p.startswith("/etc")),
        "run_dir": Path(f"/run/trustmesh/{mesh_id}").exists(),
    }
