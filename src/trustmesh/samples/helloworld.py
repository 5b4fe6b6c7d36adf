"""A stand-in for Istio's ``helloworld`` sample (images ``examples-helloworld-v1`` / ``-v2``).

``GET /hello`` → ``Hello version: <SERVICE_VERSION>, instance: <HOSTNAME>`` and a line
break, which is how Istio's version-routing and multicluster tasks tell the versions and
pods apart; ``GET /health`` → ``Helloworld is healthy``. The image's CPU-burning loop per
request (there to make autoscaling demos scale) is left out. Istio's image listens on
5000.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from trustmesh.samples.http1 import Request, Response

__all__ = ["DEFAULT_PORT", "HelloWorld"]

DEFAULT_PORT = 5000
_HTML = "text/html; charset=utf-8"  # Flask's default for a returned str


@dataclass
class HelloWorld:
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def greeting(self) -> str:
        # Python's "%s" of a missing variable is "None", as in Istio's app.
        version = self.env.get("SERVICE_VERSION", "None")
        return f"Hello version: {version}, instance: {self.env.get('HOSTNAME', 'None')}\n"

    async def route(self, request: Request) -> Response:
        path = urlsplit(request.target).path
        if path not in ("/hello", "/health"):
            return Response(404, b"Not Found\n", _HTML)
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            return Response(405, b"Method Not Allowed\n", _HTML, (("Allow", "GET, HEAD, OPTIONS"),))
        if path == "/health":
            return Response(200, b"Helloworld is healthy", _HTML)
        return Response(200, self.greeting().encode(), _HTML)
