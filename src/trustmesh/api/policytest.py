"""The ``trustmesh.dev/v1alpha1 PolicyTest`` kind: policy unit tests users write.

```yaml
apiVersion: trustmesh.dev/v1alpha1
kind: PolicyTest
metadata: {name: deny-get}
spec:
  cases:
  - name: GET is denied
    from: {workload: foo/sleep}        # or {principal: ...} or {plaintext: true}; optional ip
    to: {workload: foo/httpbin, port: 8000}   # or {host: api.example.com, port: 443} (egress)
    request: {method: GET, path: /get, headers: {x-token: guest}, jwt: eyJ...}
    expect: deny                       # allow | deny | unauthenticated | reset | bad-request
                                       # | unsupported
                                       # or {verdict, status, rule, dryRun, upstreamHeaders}
```
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trustmesh.api.models import Strict

# "unsupported": trustmesh cannot decide the case exactly (e.g. an ambient waypoint); a test
# may state it, and any other expectation then fails with the reason.
VerdictName = Literal["allow", "deny", "unauthenticated", "reset", "bad-request", "unsupported"]


class CaseSource(Strict):
    workload: str | None = None
    principal: str | None = None
    plaintext: bool = False
    ip: str | None = None

    @model_validator(mode="after")
    def _one_identity(self) -> CaseSource:
        given = [self.workload is not None, self.principal is not None, self.plaintext]
        if sum(given) != 1:
            raise ValueError("set exactly one of workload, principal or plaintext: true")
        return self


class CaseDestination(Strict):
    workload: str | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)

    @model_validator(mode="after")
    def _one_target(self) -> CaseDestination:
        if (self.workload is None) == (self.host is None):
            raise ValueError("set exactly one of workload or host")
        return self


class CaseRequest(Strict):
    method: str = "GET"
    path: str = "/"
    host: str | None = None
    headers: dict[str, str | list[str]] = Field(default_factory=dict)
    jwt: str | None = None


class Expectation(Strict):
    verdict: VerdictName | None = None
    status: int | None = None
    rule: str | None = None
    dry_run: Literal["allowed", "denied"] | None = None
    upstream_headers: dict[str, str] = Field(default_factory=dict)


class Case(Strict):
    name: str = Field(min_length=1)
    from_: CaseSource = Field(alias="from")
    to: CaseDestination
    request: CaseRequest | None = None
    tcp: bool = False
    expect: VerdictName | Expectation
    ext_authz: dict[str, Literal["allow", "deny", "unreachable"]] = Field(default_factory=dict)
    now: int | None = None  # seconds since the epoch, for JWT expiry

    @model_validator(mode="after")
    def _request_or_tcp(self) -> Case:
        if (self.request is None) == (not self.tcp):
            raise ValueError("a case has either request or tcp: true")
        return self


class PolicyTestSpec(Strict):
    cases: tuple[Case, ...] = Field(min_length=1)
