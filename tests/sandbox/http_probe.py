"""``http_probe.py HOST PORT PATH...``: one raw HTTP/1.1 GET per path (no proxy, no
library), printing ``{path: [status line or error, body]}`` as one JSON line."""

from __future__ import annotations

import json
import socket
import sys


def get(host: str, port: int, path: str) -> list[str]:
    try:
        with socket.create_connection((host, port), timeout=5) as conn:
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
    except OSError as exc:
        return [type(exc).__name__, ""]
    head, _, body = data.partition(b"\r\n\r\n")
    return [head.split(b"\r\n")[0].decode(errors="replace"), body.decode(errors="replace")]


def main() -> int:
    host, port, *paths = sys.argv[1:]
    print(json.dumps({path: get(host, int(port), path) for path in paths}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
