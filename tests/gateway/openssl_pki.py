"""Certificates made with the ``openssl`` CLI, as Istio's gateway tasks make them, and the
Kubernetes Secrets that carry them."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(root: Path, name: str, subject: str) -> None:
    """``name.crt`` / ``name.key``: a self-signed RSA root valid for 365 days from now."""
    root.mkdir(parents=True, exist_ok=True)
    openssl(
        "req", "-x509", "-sha256", "-nodes", "-days", "365", "-newkey", "rsa:2048",
        "-subj", subject, "-keyout", f"{name}.key", "-out", f"{name}.crt",
        cwd=root,
    )  # fmt: skip


def issue(root: Path, name: str, subject: str, *, ca: str, serial: int, san: str = "") -> None:
    """``name.crt`` / ``name.key`` signed by the CA files ``ca.crt`` / ``ca.key``, with a
    subjectAltName extension when ``san`` is given (``DNS:host``)."""
    openssl(
        "req", "-out", f"{name}.csr", "-newkey", "rsa:2048", "-nodes",
        "-keyout", f"{name}.key", "-subj", subject,
        cwd=root,
    )  # fmt: skip
    extensions: list[str] = []
    if san:
        (root / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        extensions = ["-extfile", f"{name}.ext"]
    openssl(
        "x509", "-req", "-sha256", "-days", "365", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-set_serial", str(serial), "-in", f"{name}.csr", "-out", f"{name}.crt",
        *extensions,
        cwd=root,
    )  # fmt: skip


def secret_yaml(
    name: str, kind: str, data: dict[str, Path], namespace: str = "istio-system"
) -> str:
    """A Secret of type ``kind`` whose keys hold the files' bytes, as `kubectl create
    secret` writes it."""
    lines = "".join(
        f"  {k}: {base64.b64encode(v.read_bytes()).decode()}\n" for k, v in data.items()
    )
    return (
        "apiVersion: v1\nkind: Secret\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"type: {kind}\ndata:\n{lines}"
    )
