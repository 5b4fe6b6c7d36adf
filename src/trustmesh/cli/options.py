"""Options several commands share: where objects without a namespace go, and how to treat
workloads whose namespace (and so its injection labels) is not among the inputs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

NamespaceOpt = Annotated[
    str,
    typer.Option(
        "-n",
        "--namespace",
        help="Namespace of objects that do not set metadata.namespace (as kubectl -n).",
    ),
]
AssumeInjectedOpt = Annotated[
    bool,
    typer.Option(
        "--assume-injected",
        help="Treat workloads whose namespace is not among the inputs (so its injection labels"
        " are unknown) as having a sidecar, instead of unknown (answered as not injected).",
    ),
]
StateOpt = Annotated[
    Path,
    typer.Option("--state", envvar="TRUSTMESH_STATE", help="The mesh's state directory."),
]
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def namespace_problem(namespace: str) -> str | None:
    """Why ``namespace`` cannot be a Kubernetes namespace name, or None."""
    if len(namespace) <= 63 and _DNS_LABEL.fullmatch(namespace):
        return None
    return (
        f"-n/--namespace {namespace!r} is not a namespace name (lower-case letters, digits"
        " and '-', at most 63 characters)"
    )


def qualify(ref: str, namespace: str) -> str:
    """``NAME`` → ``NAMESPACE/NAME``, as kubectl resolves a name with ``-n``."""
    return ref if not ref or "/" in ref else f"{namespace}/{ref}"
