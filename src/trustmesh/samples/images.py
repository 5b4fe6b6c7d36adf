"""Which container images trustmesh can stand in for, and how each image runs (pure).

A pod of Istio's samples names an image and no command: Kubernetes would run the image's
entrypoint. The local runtime runs a built-in stand-in instead (``trustmesh sample …``)
that listens where the image listens and reads the environment the image reads. What
each image does by default — its port, its ``ENV`` lines, whether container ``args`` reach
it — is recorded here from Istio's Dockerfiles and build files (istio/istio samples/).

Images are recognised by the last part of their repository path, whatever the registry,
owner and tag: ``docker.io/istio/examples-bookinfo-reviews-v2:1.20.3``,
``registry.istio.io/release/examples-bookinfo-reviews-v2``, ``gcr.io/istio-release/…`` and
``localhost:5000/examples-bookinfo-reviews-v2@sha256:…`` are the same image here.

:func:`parse_image` splits a reference as Docker does (``nginx`` is
``docker.io/library/nginx``); :func:`image_matches` is how ``trustmesh up --image
IMAGE=COMMAND`` compares a user's pattern with a container's image.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["ImageRef", "StandIn", "image_matches", "known_images", "parse_image", "stand_in_for"]

DEFAULT_REGISTRY = "docker.io"


@dataclass(frozen=True, slots=True)
class ImageRef:
    """``registry/path:tag@digest``; registry is ``docker.io`` when the reference names none."""

    registry: str
    path: str
    tag: str = ""
    digest: str = ""
    explicit_registry: bool = field(default=False, compare=False)  # as written, not its value

    @property
    def name(self) -> str:
        """The last part of the path: ``examples-bookinfo-reviews-v2``."""
        return self.path.rsplit("/", 1)[-1]


def parse_image(reference: str) -> ImageRef:
    """Split an image reference the way Docker does; ``ValueError`` if it has no name."""
    text = reference.strip()
    rest, _, digest = text.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    tag = ""
    if colon > slash:  # a colon after the last slash is a tag, before it a registry port
        rest, tag = rest[:colon], rest[colon + 1 :]
    first, sep, remainder = rest.partition("/")
    explicit = bool(sep) and ("." in first or ":" in first or first == "localhost")
    registry, path = (first, remainder) if explicit else (DEFAULT_REGISTRY, rest)
    if not path or path.endswith("/") or "//" in path:
        raise ValueError(f"{reference!r} is not an image reference")
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"  # Docker Hub's official images
    return ImageRef(registry, path.lower(), tag, digest, explicit)


def image_matches(pattern: str, image: str) -> bool:
    """Whether ``--image`` ``pattern`` names ``image``: its path is the image's path or a
    trailing part of it (whole components), and its registry, tag and digest, when it
    names them, are the image's."""
    try:
        want, have = parse_image(pattern), parse_image(image)
    except ValueError:
        return False
    if want.explicit_registry and want.registry != have.registry:
        return False
    if want.tag and want.tag != have.tag:
        return False
    if want.digest and want.digest != have.digest:
        return False
    wanted = want.path.removeprefix("library/") if not want.explicit_registry else want.path
    return have.path == wanted or have.path.endswith("/" + wanted)


@dataclass(frozen=True, slots=True)
class StandIn:
    """How the stand-in for one image runs.

    ``sample``: the ``trustmesh sample`` command; ``ports``: where the image listens;
    ``env``: the image's own ``ENV`` (a container's ``env`` overrides it); ``args``: what
    container ``args`` mean for it — ``"none"`` (the image has only a CMD, which args
    would replace: not runnable here), ``"tcp-echo"`` (``PORTS,… PREFIX`` as Istio's
    tcp-echo-server takes them), ``"ext-authz"`` (the extauthz binary's Go flags).
    """

    image: str
    sample: str
    ports: tuple[int, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    args: str = "none"
    note: str = ""

    def command(self, args: tuple[str, ...] = ()) -> tuple[str, ...]:
        """``trustmesh sample …`` for this image given the container's ``args``;
        ``ValueError`` (the reason) when they cannot be run."""
        base = ("trustmesh", "sample", self.sample)
        if self.args == "ext-authz":
            return (*base, *_ext_authz_args(args))
        if self.args == "tcp-echo":
            ports, prefix = self.ports, "hello"
            if args:
                ports, prefix = _tcp_echo_args(args)
            return (*base, *(f"--port={p}" for p in ports), f"--prefix={prefix}")
        if args:
            raise ValueError(
                f"container args replace the image's command ({self.image} has no "
                "entrypoint that takes them); remove args or set command"
            )
        return (*base, *(f"--port={p}" for p in self.ports))


def _tcp_echo_args(args: tuple[str, ...]) -> tuple[tuple[int, ...], str]:
    # Istio's server wants exactly "PORT[,PORT…] PREFIX" and exits otherwise.
    if len(args) != 2:
        raise ValueError(
            f"tcp-echo-server takes exactly two args, PORTS (comma-separated) and PREFIX; "
            f"got {len(args)}"
        )
    ports = []
    for text in args[0].split(","):
        if not text.strip().isdigit() or not 1 <= int(text) <= 65535:
            raise ValueError(f"tcp-echo-server port {text!r} is not a port number")
        ports.append(int(text))
    return tuple(dict.fromkeys(ports)), args[1]


_EXT_AUTHZ_FLAGS = {
    "http": "--http",
    "grpc": "--grpc",
    "allow_service_account": "--allow-service-account",
}


def _ext_authz_args(args: tuple[str, ...]) -> tuple[str, ...]:
    """Istio's extauthz binary takes Go flags (``-http 8000``, ``--grpc=9000``,
    ``-allow_service_account a``) as container args; the same flags for the stand-in."""
    out: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        name, equals, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-") or name not in _EXT_AUTHZ_FLAGS:
            raise ValueError(
                f"ext-authz takes -http PORT, -grpc PORT and -allow_service_account NAME; "
                f"got {arg!r}"
            )
        if not equals:
            if not rest:
                raise ValueError(f"ext-authz flag {arg} needs a value")
            value = rest.pop(0)
        if name in ("http", "grpc") and not (value.isdigit() and 0 < int(value) <= 65535):
            raise ValueError(f"ext-authz -{name} {value!r} is not a port number")
        out.append(f"{_EXT_AUTHZ_FLAGS[name]}={value}")
    return tuple(out)


def _env(**values: str) -> Mapping[str, str]:
    return MappingProxyType(values)


_TABLE: tuple[StandIn, ...] = (
    StandIn("examples-bookinfo-productpage-v1", "productpage", (9080,), _env(FLOOD_FACTOR="0")),
    StandIn(
        "examples-bookinfo-productpage-v-flooding",
        "productpage",
        (9080,),
        _env(FLOOD_FACTOR="100"),
    ),
    StandIn(
        "examples-bookinfo-details-v1",
        "details",
        (9080,),
        _env(SERVICE_VERSION="v1", ENABLE_EXTERNAL_BOOK_SERVICE="false"),
    ),
    StandIn(
        "examples-bookinfo-reviews-v1",
        "reviews",
        (9080,),
        _env(SERVICE_VERSION="v1", ENABLE_RATINGS="false", STAR_COLOR="black"),
    ),
    StandIn(
        "examples-bookinfo-reviews-v2",
        "reviews",
        (9080,),
        _env(SERVICE_VERSION="v2", ENABLE_RATINGS="true", STAR_COLOR="black"),
    ),
    StandIn(
        "examples-bookinfo-reviews-v3",
        "reviews",
        (9080,),
        _env(SERVICE_VERSION="v3", ENABLE_RATINGS="true", STAR_COLOR="red"),
    ),
    *(
        StandIn(f"examples-bookinfo-ratings-{v}", "ratings", (9080,), _env(SERVICE_VERSION=v))
        for v in ("v1", "v-faulty", "v-delayed", "v-unavailable", "v-unhealthy")
    ),
    StandIn("httpbin", "httpbin", (80,), note="kennethreitz/httpbin (gunicorn on port 80)"),
    StandIn("go-httpbin", "httpbin", (8080,), note="mccutchen/go-httpbin (port 8080)"),
    StandIn("tcp-echo-server", "tcp-echo", (9000,), args="tcp-echo"),
    StandIn(
        "ext-authz",
        "ext-authz",
        (8000, 9000),
        args="ext-authz",
        note="Istio's samples/extauthz: HTTP checks on 8000, gRPC Authorization/Check on 9000",
    ),
    StandIn(
        "curl",
        "sleep",
        note="curlimages/curl: Istio's samples give it `sleep` as command; without one the "
        "stand-in idles instead of running curl once and exiting",
    ),
    StandIn("curl-ssl", "sleep", note="governmentpaas/curl-ssl, as curl"),
)
_BY_NAME = {stand_in.image: stand_in for stand_in in _TABLE}
_HELLOWORLD = re.compile(r"examples-helloworld-(v[0-9]+)")


def stand_in_for(image: str) -> StandIn | None:
    """The stand-in for ``image`` (any registry, owner and tag), None if there is none."""
    try:
        name = parse_image(image).name
    except ValueError:
        return None
    found = _BY_NAME.get(name)
    if found is not None:
        return found
    version = _HELLOWORLD.fullmatch(name)
    if version is not None:  # Istio's gen-helloworld.sh builds any vN the same way
        return StandIn(name, "helloworld", (5000,), _env(SERVICE_VERSION=version.group(1)))
    return None


def known_images() -> list[str]:
    """The image names recognised, for messages and the README."""
    return [*_BY_NAME, "examples-helloworld-v<N>"]
