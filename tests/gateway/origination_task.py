"""Istio's "Egress TLS Origination" task's ServiceEntry and DestinationRule, as written:
shared by the offline and the live tests of origination at the sidecar."""

from __future__ import annotations

# Istio's task, as written.
SERVICE_ENTRY = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: edition-cnn-com
  namespace: foo
spec:
  hosts:
  - edition.cnn.com
  ports:
  - number: 80
    name: http-port
    protocol: HTTP
    targetPort: 443
  - number: 443
    name: https-port
    protocol: HTTPS
  resolution: DNS
"""


def rule(tls: str, port: int = 80) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: edition-cnn-com
  namespace: foo
spec:
  host: edition.cnn.com
  trafficPolicy:
    portLevelSettings:
    - port:
        number: {port}
      tls:
{tls}
"""
