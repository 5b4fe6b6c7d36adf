"""What process a pod's container becomes, and how Kubernetes would restart it (pure).

A container with a ``command`` runs that command (+ ``args``), as today. One without runs
what its image would run: a ``--image IMAGE=COMMAND`` mapping given to ``trustmesh up``
(the container's ``args`` appended, as Kubernetes passes them to an entrypoint), else the
built-in stand-in for a known image (:mod:`trustmesh.samples.images`: Istio's httpbin,
curl, tcp-echo, helloworld and bookinfo), whose own ``ENV`` comes first in the
environment. Anything else is an error naming the container's ``image`` (or ``command``)
line.

``restartPolicy`` is read as the kubelet reads it: ``Always`` (the default) for every
pod, ``OnFailure`` and ``Never`` honoured for bare Pods, and refused on a controller's pod
template, where the API server accepts only ``Always``.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.diagnostics import Diagnostic, error
from trustmesh.api.resources import Resource
from trustmesh.samples.images import image_matches, known_images, stand_in_for

__all__ = [
    "RESTART_POLICIES",
    "ContainerRun",
    "ImageCommand",
    "container_run",
    "parse_image_command",
    "restart_policy",
]

RESTART_POLICIES = ("Always", "OnFailure", "Never")


@dataclass(frozen=True, slots=True)
class ImageCommand:
    """``--image IMAGE=COMMAND``: containers of ``image`` without a command run ``command``."""

    image: str
    command: tuple[str, ...]


def parse_image_command(text: str) -> ImageCommand:
    """``IMAGE=COMMAND`` (COMMAND split as a shell would); ``ValueError`` saying why not."""
    image, sep, command = text.partition("=")
    if not sep or not image.strip():
        raise ValueError(f"--image must be IMAGE=COMMAND, got {text!r}")
    try:
        argv = tuple(shlex.split(command))
    except ValueError as exc:
        raise ValueError(f"--image {image}: cannot split the command {command!r}: {exc}") from None
    if not argv:
        raise ValueError(f"--image {image}: the command is empty")
    return ImageCommand(image.strip(), argv)


@dataclass(frozen=True, slots=True)
class ContainerRun:
    """The argv of a container and the environment its image brings (below the pod's)."""

    argv: tuple[str, ...]
    image_env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


def container_run(
    resource: Resource[Any],
    prefix: tuple[str, ...],
    ref: str,
    container: m.Container,
    images: Sequence[ImageCommand] = (),
) -> ContainerRun | Diagnostic:
    """How the first container of ``resource`` (its pod spec at ``prefix``) runs."""
    if container.command:
        return ContainerRun((*container.command, *container.args))
    where = resource.location(*prefix, "containers", 0, "image" if container.image else "command")
    if not container.image:
        return error(
            "no-command",
            where,
            f"{ref}: the container has neither a command nor an image; set command "
            "(e.g. [trustmesh, sample, httpbin]) or the image it runs",
        )
    for mapping in images:
        if image_matches(mapping.image, container.image):
            return ContainerRun((*mapping.command, *container.args))
    stand_in = stand_in_for(container.image)
    if stand_in is None:
        return error(
            "unknown-image",
            where,
            f"{ref}: image {container.image!r} has no built-in stand-in and the container "
            "has no command; set command, or map the image with `trustmesh up --image "
            f"IMAGE=COMMAND` (known images: {', '.join(known_images())})",
        )
    try:
        argv = stand_in.command(container.args)
    except ValueError as exc:
        where = resource.location(*prefix, "containers", 0, "args")
        return error("unrunnable-args", where, f"{ref}: image {container.image!r}: {exc}")
    return ContainerRun(argv, stand_in.env)


def restart_policy(
    resource: Resource[Any], prefix: tuple[str, ...], kind: str, spec: m.PodSpec
) -> str | Diagnostic:
    """The pod's restart policy, or why it is refused (with its location)."""
    policy = spec.restart_policy or "Always"
    if policy not in RESTART_POLICIES or (kind != "Pod" and policy != "Always"):
        allowed = RESTART_POLICIES if kind == "Pod" else ("Always",)
        return error(
            "bad-restart-policy",
            resource.location(*prefix, "restartPolicy"),
            f"restartPolicy {policy!r} is not supported for a {kind}'s pods: supported "
            f"values are {', '.join(allowed)}",
        )
    return policy
