"""An attacker inside a pod asks some pod's SDS socket for its secrets.

``sds_probe.py SOCKET``: one JSON line — ``{"connect": "EACCES"}`` when the socket cannot
even be opened, else the outcome of a FetchSecrets call for the workload certificate:
``{"grpc": "UNAVAILABLE"}`` (refused), ``{"grpc": "OK", "secrets": N, "key": bool}``.
"""

from __future__ import annotations

import errno
import json
import socket
import sys


def main() -> int:
    path = sys.argv[1]
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except OSError as exc:
        print(json.dumps({"connect": errno.errorcode.get(exc.errno or 0, str(exc))}))
        return 0
    finally:
        probe.close()
    import grpc
    from envoy.service.discovery.v3 import discovery_pb2
    from envoy.service.secret.v3 import sds_pb2_grpc

    channel = grpc.insecure_channel(f"unix:{path}")
    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
    request = discovery_pb2.DiscoveryRequest(resource_names=["default", "ROOTCA"])
    try:
        response = stub.FetchSecrets(request, timeout=5)
    except grpc.RpcError as exc:
        print(json.dumps({"grpc": exc.code().name}))
        return 0
    finally:
        channel.close()
    text = bytes(response.SerializeToString())
    print(json.dumps({"grpc": "OK", "secrets": len(response.resources), "key": b"PRIVATE" in text}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
