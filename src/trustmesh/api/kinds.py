"""Which kinds and versions the Kubernetes API server serves in the groups trustmesh judges.

A resource the cluster would refuse ("no matches for kind X in version Y") must not be
silently skipped: a misspelled ``AuthorisationPolicy`` would leave a DENY-all unenforced.
For the groups whose every kind is known here — Istio's (``*.istio.io``, from istio/api
``kubernetes/customresourcedefinitions.gen.yaml``, as a union over the releases still in
use) and the Kubernetes built-ins ``""`` (core) and ``apps``, which no CRD can extend — an
unknown kind or an unserved version is an error with a suggestion. Kinds of other groups
(Gateway API, cert-manager, …) are unknown to trustmesh, kept and listed, never enforced.

Pure data and string distance; the loader decides what to do with a :class:`Verdict`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

_MESH = ("v1", "v1beta1", "v1alpha3")  # networking.istio.io kinds promoted to v1 in 1.22
_SECURITY = ("v1", "v1beta1")

# group → kind → served versions. Kinds trustmesh does not model are still listed: they are
# valid input, kept and ignored (and the analyzer reads some of them raw).
SERVED: dict[str, dict[str, tuple[str, ...]]] = {
    "security.istio.io": {
        "AuthorizationPolicy": _SECURITY,
        "PeerAuthentication": _SECURITY,
        "RequestAuthentication": _SECURITY,
    },
    "networking.istio.io": {
        "DestinationRule": _MESH,
        "EnvoyFilter": ("v1alpha3",),
        "Gateway": _MESH,
        "ProxyConfig": ("v1beta1",),
        "ServiceEntry": _MESH,
        "Sidecar": _MESH,
        "VirtualService": _MESH,
        "WorkloadEntry": _MESH,
        "WorkloadGroup": _MESH,
    },
    "telemetry.istio.io": {"Telemetry": ("v1", "v1alpha1")},
    "extensions.istio.io": {"WasmPlugin": ("v1alpha1",), "TrafficExtension": ("v1alpha1",)},
    # Read by istioctl and the (retired) in-cluster operator, not served as a CRD today.
    "install.istio.io": {"IstioOperator": ("v1alpha1",)},
    # The Sail Operator before 1.0 (now sailoperator.io).
    "operator.istio.io": {
        kind: ("v1alpha1",)
        for kind in (
            "Istio",
            "IstioRevision",
            "IstioRevisionTag",
            "IstioCNI",
            "RemoteIstio",
            "ZTunnel",
        )
    },
    "": {
        kind: ("v1",)
        for kind in (
            "Binding",
            "ComponentStatus",
            "ConfigMap",
            "Endpoints",
            "Event",
            "LimitRange",
            "Namespace",
            "Node",
            "PersistentVolume",
            "PersistentVolumeClaim",
            "Pod",
            "PodTemplate",
            "ReplicationController",
            "ResourceQuota",
            "Secret",
            "Service",
            "ServiceAccount",
        )
    },
    "apps": {
        kind: ("v1",)
        for kind in ("ControllerRevision", "DaemonSet", "Deployment", "ReplicaSet", "StatefulSet")
    },
}

# Groups no current cluster serves: what replaced them.
REMOVED_GROUPS: dict[str, str] = {
    "rbac.istio.io": "removed in Istio 1.6 (nothing it describes is enforced); "
    "rewrite it as an AuthorizationPolicy (security.istio.io/v1)",
    "authentication.istio.io": "removed in Istio 1.6 (nothing it describes is enforced); "
    "rewrite it as PeerAuthentication / RequestAuthentication (security.istio.io/v1)",
    "config.istio.io": "removed with Mixer in Istio 1.8; use AuthorizationPolicy (CUSTOM), "
    "Telemetry or WasmPlugin",
}
REMOVED_KINDS: dict[tuple[str, str], str] = {
    ("extensions", kind): "removed in Kubernetes 1.16; use apps/v1"
    for kind in ("Deployment", "DaemonSet", "ReplicaSet")
}

_CLOSED_GROUPS = frozenset({"", "apps"})
_API_VERSION = re.compile(r"^(?:[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?/)?[a-z0-9]+$")


def is_istio_group(group: str) -> bool:
    return group == "istio.io" or group.endswith(".istio.io")


def is_closed_group(group: str) -> bool:
    """Every kind of this group is known here: anything else is refused by a cluster."""
    return group in _CLOSED_GROUPS or is_istio_group(group)


def is_served(group: str, kind: str) -> bool:
    return kind in SERVED.get(group, {})


def api_version(group: str, version: str) -> str:
    return f"{group}/{version}" if group else version


def preferred_api_version(group: str, kind: str) -> str:
    return api_version(group, SERVED[group][kind][0])


class Problem(enum.Enum):
    """What is wrong with an apiVersion / kind pair (the value is the diagnostic code)."""

    BAD_API_VERSION = "invalid-api-version"
    UNKNOWN_GROUP = "unknown-group"
    WRONG_GROUP = "wrong-group"
    UNSERVED_VERSION = "unsupported-version"
    UNKNOWN_KIND = "unknown-kind"
    REMOVED_API = "removed-api"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a cluster would refuse the object: ``field`` says where to point the error."""

    problem: Problem
    message: str

    @property
    def field(self) -> str:
        return "kind" if self.problem is Problem.UNKNOWN_KIND else "apiVersion"

    @property
    def code(self) -> str:
        return self.problem.value

    @property
    def is_error(self) -> bool:
        """A removed API is a warning: no current cluster serves it, so Istio enforces
        none of it — which is also what trustmesh decides (the analyzer's TM-INST-015
        reports it as an error finding with the rewrite)."""
        return self.problem is not Problem.REMOVED_API


def check(api_version_text: str, kind: str) -> Refusal | None:
    """None when a cluster with Istio installed would accept ``apiVersion`` + ``kind``, or
    when the group is not one trustmesh can judge; else why it would be refused."""
    key = (api_version_text, kind)
    try:
        return _CHECKED[key]
    except KeyError:
        pass
    found = _check(api_version_text, kind)
    if len(_CHECKED) < _CHECKED_MAX:  # a large input repeats a handful of pairs
        _CHECKED[key] = found
    return found


_CHECKED: dict[tuple[str, str], Refusal | None] = {}
_CHECKED_MAX = 4096


def _check(api_version_text: str, kind: str) -> Refusal | None:
    if not _API_VERSION.match(api_version_text):
        return Refusal(
            Problem.BAD_API_VERSION,
            f"apiVersion {api_version_text!r} is not GROUP/VERSION (for example "
            f"security.istio.io/v1) or a core version (v1)",
        )
    group, _, version = api_version_text.rpartition("/")
    if group in REMOVED_GROUPS:
        return Refusal(
            Problem.REMOVED_API, f"{kind} in {api_version_text} was {REMOVED_GROUPS[group]}"
        )
    removed = REMOVED_KINDS.get((group, kind))
    if removed is not None:
        return Refusal(Problem.REMOVED_API, f"{kind} in {api_version_text} was {removed}")
    if not is_closed_group(group):
        return _near_miss_group(group, kind)
    served = SERVED.get(group)
    if served is None:
        return _unknown_group(group, kind)
    versions = served.get(kind)
    if versions is None:
        return _unknown_kind(group, kind)
    if version not in versions:
        listed = ", ".join(api_version(group, v) for v in versions)
        return Refusal(
            Problem.UNSERVED_VERSION,
            f"{api_version_text} is not a served version of {kind} (served: {listed})",
        )
    return None


def _near_miss_group(group: str, kind: str) -> Refusal | None:
    """A kind of a known group under a group one or two typos away from it."""
    for home in homes_of(kind):
        if home and distance(group, home) <= 2:
            return Refusal(
                Problem.WRONG_GROUP,
                f"{kind} is in {_group_name(home)}, not {group}: "
                f"use apiVersion: {preferred_api_version(home, kind)}",
            )
    return None


def _unknown_group(group: str, kind: str) -> Refusal:
    homes = homes_of(kind)
    if homes:
        home = homes[0]
        use = preferred_api_version(home, kind)
        hint = f"{kind} is in {_group_name(home)}: use apiVersion: {use}"
    else:
        known = sorted(g for g in SERVED if is_istio_group(g))
        closest = min(known, key=lambda g: distance(group, g))
        hint = f"did you mean {closest}?" if distance(group, closest) <= 3 else ""
        hint = hint or "Istio serves " + ", ".join(known)
    return Refusal(Problem.UNKNOWN_GROUP, f"{group} is not an API group Istio serves; {hint}")


def _unknown_kind(group: str, kind: str) -> Refusal:
    served = SERVED[group]
    where = _group_name(group)
    exact = homes_of(kind)
    if exact:
        home = exact[0]
        return Refusal(
            Problem.WRONG_GROUP,
            f"{kind} is in {_group_name(home)}, not {where}: "
            f"use apiVersion: {preferred_api_version(home, kind)}",
        )
    suggestion = closest_kind(kind, group)
    if suggestion is not None:
        home, name = suggestion
        if home == group:
            hint = f"did you mean {name}?"
        else:
            hint = f"did you mean {name} (apiVersion: {preferred_api_version(home, name)})?"
    else:
        hint = f"{where} serves " + ", ".join(sorted(served))
    return Refusal(Problem.UNKNOWN_KIND, f"no kind {kind!r} is served in {where}; {hint}")


def homes_of(kind: str) -> list[str]:
    """Known groups serving exactly ``kind``, Istio's first."""
    found = [g for g, kinds in SERVED.items() if kind in kinds]
    return sorted(found, key=lambda g: (not is_istio_group(g), g))


def closest_kind(kind: str, group: str) -> tuple[str, str] | None:
    """The known kind closest to ``kind`` by edit distance (ignoring case), preferring
    ``group`` on ties; None when nothing is close enough to be a typo."""
    wanted = kind.lower()
    best: tuple[int, int, str, str] | None = None
    for home, kinds in SERVED.items():
        for name in kinds:
            score = distance(wanted, name.lower())
            candidate = (score, 0 if home == group else 1, home, name)
            if best is None or candidate < best:
                best = candidate
    if best is None:
        return None
    score, _, home, name = best
    return (home, name) if score <= max(1, len(kind) // 4) else None


def _group_name(group: str) -> str:
    return group or "the core group (apiVersion: v1)"


def distance(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions and
    swaps of neighbours (``Deploymnet`` is one step from ``Deployment``)."""
    if a == b:
        return 0
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cost = 0 if ca == cb else 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[-1]


def suggest(word: str, candidates: list[str], limit: int = 5) -> list[str]:
    """Candidates ordered by edit distance to ``word`` (closest first), at most ``limit``."""
    return sorted(candidates, key=lambda c: (distance(word.lower(), c.lower()), c))[:limit]


__all__ = [
    "REMOVED_GROUPS",
    "SERVED",
    "Problem",
    "Refusal",
    "check",
    "closest_kind",
    "distance",
    "homes_of",
    "is_closed_group",
    "is_istio_group",
    "is_served",
    "suggest",
]
