"""SPIFFE IDs of the form Istio uses: ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``."""

from __future__ import annotations

import re
from dataclasses import dataclass

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_TRUST_DOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class InvalidSpiffeId(ValueError):
    pass


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A workload identity. ``str()`` gives the URI; :meth:`principal` the policy form."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN.match(self.trust_domain) or len(self.trust_domain) > 255:
            raise InvalidSpiffeId(f"invalid trust domain {self.trust_domain!r}")
        for what, value in (
            ("namespace", self.namespace),
            ("service account", self.service_account),
        ):
            if not _NAME.match(value) or len(value) > 253:
                raise InvalidSpiffeId(f"invalid {what} {value!r}")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def principal(self) -> str:
        """The form AuthorizationPolicy ``principals`` use (no scheme)."""
        return self.uri.removeprefix("spiffe://")

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Strict parse: exactly ``spiffe://TD/ns/NS/sa/SA``, nothing before or after."""
        if not uri.startswith("spiffe://"):
            raise InvalidSpiffeId(f"{uri!r} is not a spiffe:// URI")
        parts = uri.removeprefix("spiffe://").split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise InvalidSpiffeId(f"{uri!r} is not of the form spiffe://TD/ns/NS/sa/SA")
        return cls(parts[0], parts[2], parts[4])
