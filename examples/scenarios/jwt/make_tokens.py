"""Generate the JWKS and tokens the JWT scenarios (09-11, 20) embed.

Usage: python examples/scenarios/jwt/make_tokens.py > examples/scenarios/jwt/tokens.txt

A fresh EC P-256 key is made on every run and only its public half is printed: the
private key is never written anywhere. After a rerun, paste the new ``jwks`` into the
RequestAuthentication of each JWT scenario and the tokens into its test.yaml.

The claims follow Istio's samples (security/tools/jwt/samples): issuer and subject
``testing@secure.istio.io``, ``foo: bar`` on the plain token (demo.jwt) and
``groups: [group1, group2]`` on the group token (groups-scope.jwt).
"""

from __future__ import annotations

import json

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

ISSUER = "testing@secure.istio.io"
SUBJECT = "testing@secure.istio.io"
KID = "trustmesh-scenarios"
VALID_UNTIL = 4_102_444_800  # 2100-01-01T00:00:00Z
ISSUED_AT = 1_700_000_000  # 2023-11-14
EXPIRED_AT = 1_700_003_600  # one hour after issue: long past the test clock


def _public_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, str]:
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "alg": "ES256", "use": "sig"}


def _sign(key: ec.EllipticCurvePrivateKey, kid: str, **claims: object) -> str:
    payload = {"iss": ISSUER, "sub": SUBJECT, "iat": ISSUED_AT, **claims}
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": kid})


def main() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())  # not in the JWKS
    jwks = json.dumps({"keys": [_public_jwk(key, KID)]}, separators=(",", ":"))
    tokens = {
        # demo.jwt: valid, claim foo, no groups
        "valid": _sign(key, KID, exp=VALID_UNTIL, foo="bar"),
        # groups-scope.jwt: valid, with groups
        "groups": _sign(
            key, KID, exp=VALID_UNTIL, groups=["group1", "group2"], scope=["scope1", "scope2"]
        ),
        # correct key, exp long past
        "expired": _sign(key, KID, exp=EXPIRED_AT, foo="bar"),
        # same kid and claims, signed by a key the JWKS does not hold
        "wrong-key": _sign(other, KID, exp=VALID_UNTIL, foo="bar"),
    }
    print(f"jwks: '{jwks}'")
    print("tokens:")
    for name, token in tokens.items():
        print(f"  {name}: {token}")


if __name__ == "__main__":
    main()
