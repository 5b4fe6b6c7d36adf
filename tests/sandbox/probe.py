"""A stand-in process for sandbox tests, run inside a pod through podexec.

``probe.py listen PORT...``: accept on 0.0.0.0:PORT (each in a thread); for every
connection answer one JSON line: the port it was accepted on, the original destination
(SO_ORIGINAL_DST, set when a REDIRECT rule moved it) and the peer address.
``probe.py connect HOST PORT``: connect (names through /etc/hosts) and print that line,
or ``{"error": ...}``. ``probe.py resolve NAME``: print the address getaddrinfo gives.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading

SO_ORIGINAL_DST = 80


def _original(conn: socket.socket) -> str | None:
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port, packed = struct.unpack_from("!2xH4s", raw)
    return f"{socket.inet_ntoa(packed)}:{port}"


def _serve(port: int) -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen(16)
    while True:
        conn, peer = server.accept()
        with conn:
            line = {"port": port, "original": _original(conn), "peer": f"{peer[0]}:{peer[1]}"}
            conn.sendall((json.dumps(line) + "\n").encode())


def main() -> int:
    command, *args = sys.argv[1:]
    if command == "listen":
        for port in map(int, args):
            threading.Thread(target=_serve, args=(port,), daemon=True).start()
        print("ready", flush=True)
        threading.Event().wait()
    if command == "connect":
        host, port = args[0], int(args[1])
        try:
            with socket.create_connection((host, port), timeout=3) as conn:
                print(conn.makefile().readline().strip() or '{"error": "closed"}')
        except OSError as exc:
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 0
    if command == "resolve":
        try:
            print(socket.getaddrinfo(args[0], 80, socket.AF_INET)[0][4][0])
        except OSError as exc:
            print(f"error: {exc}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
