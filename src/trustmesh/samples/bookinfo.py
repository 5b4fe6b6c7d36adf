"""Stand-ins for Istio's bookinfo backends: ``details``, ``reviews`` (v1, v2, v3) and ``ratings``.

They answer what Istio's images answer (samples/bookinfo/src in istio/istio), read the
same environment variables, and call each other the way those apps do — by service name,
propagating the tracing and identity headers Istio asks apps to forward. The product page
is :mod:`trustmesh.samples.productpage`.

* **details** (Ruby in Istio): ``/details/<id>`` → the book's details as JSON; an id that
  is not an integer → 400 ``{"error": "please provide numeric product id"}``;
  ``/health``.
* **reviews** (Java): ``/reviews/<id>`` → two reviews. With ``ENABLE_RATINGS=true`` (the
  v2 and v3 images) it first calls ``http://ratings<.SERVICES_DOMAIN>:9080/ratings/<id>``
  (``RATINGS_HOSTNAME``, ``RATINGS_SERVICE_PORT``) and adds each reviewer's stars in
  ``STAR_COLOR`` (black for v2, red for v3), or, when that call fails or answers other
  than 200, ``{"error": "Ratings service is currently unavailable"}``. ``podname`` is
  ``HOSTNAME``. ``/health``.
* **ratings** (Node): ``GET /ratings/<id>`` → ``{"id", "ratings": {"Reviewer1": 5,
  "Reviewer2": 4}}``; ``POST`` stores other ratings for an id (in memory);
  ``SERVICE_VERSION`` selects Istio's variants: ``v-faulty`` (half the answers 503),
  ``v-delayed`` (half the answers 7 s late), ``v-unavailable`` (503 every other minute),
  ``v-unhealthy`` (503 and an unhealthy ``/health`` every other 15 minutes), ``v2``
  (database-backed: no database here, so it fails as the image does without one).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from trustmesh.samples.http1 import Request, Response, json_response, text_response
from trustmesh.samples.outbound import CallFailed, http_get

__all__ = [
    "DEFAULT_PORT",
    "PROPAGATED_HEADERS",
    "RATINGS_UNAVAILABLE",
    "Details",
    "Ratings",
    "Reviews",
    "forwarded",
    "service_url",
]

DEFAULT_PORT = 9080
RATINGS_UNAVAILABLE = "Ratings service is currently unavailable"

# The headers every bookinfo app copies from the request it serves to the requests it
# makes (Istio's list, "keep this in sync" in details.rb, productpage.py and reviews):
# request id, tracing contexts (Lightstep, Datadog, W3C, Cloud Trace, gRPC, B3,
# SkyWalking), and the caller's identity and session.
PROPAGATED_HEADERS = (
    "x-request-id",
    "x-ot-span-context",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
    "traceparent",
    "tracestate",
    "x-cloud-trace-context",
    "grpc-trace-bin",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "sw8",
    "end-user",
    "user-agent",
    "cookie",
    "authorization",
    "jwt",
)


def forwarded(
    request: Request, names: tuple[str, ...] = PROPAGATED_HEADERS
) -> list[tuple[str, str]]:
    """The headers of ``request`` an app forwards on its own calls (repeated ones joined)."""
    found = []
    for name in names:
        value = request.header(name)
        if value is not None:
            found.append((name, value))
    return found


def service_url(env: Mapping[str, str], service: str) -> str:
    """``http://<NAME><.SERVICES_DOMAIN>:<PORT>`` as bookinfo's apps build it from
    ``<SERVICE>_HOSTNAME``, ``SERVICES_DOMAIN`` and ``<SERVICE>_SERVICE_PORT``. A
    ``SERVICES_DOMAIN`` that is set, even empty, is appended after a dot, as they do."""
    upper = service.upper()
    host = env.get(f"{upper}_HOSTNAME", service)
    domain = env.get("SERVICES_DOMAIN")
    port = env.get(f"{upper}_SERVICE_PORT", str(DEFAULT_PORT))
    return f"http://{host}{'' if domain is None else '.' + domain}:{port}"


def _path(request: Request) -> str:
    return urlsplit(request.target).path


def _not_found() -> Response:
    return text_response("Not Found\n", 404)


# ---------------------------------------------------------------------------- details


_RUBY_INTEGER = re.compile(
    r"\s*[-+]?(0[xX][0-9a-fA-F]+(_[0-9a-fA-F]+)*|0[bB][01]+(_[01]+)*|0[oO]?[0-7]+(_[0-7]+)*"
    r"|[0-9]+(_[0-9]+)*)\s*"
)


def ruby_integer(text: str) -> int | None:
    """Ruby's ``Integer(text)``: decimal, ``0x``/``0b``/``0o``/``0`` prefixes, ``_``
    between digits, surrounding blanks; None where Ruby raises."""
    if not _RUBY_INTEGER.fullmatch(text):
        return None
    cleaned = text.strip().replace("_", "")
    sign = -1 if cleaned.startswith("-") else 1
    digits = cleaned.lstrip("+-").lower()
    if len(digits) > 1 and digits[0] == "0" and digits[1].isdigit():
        digits = "0o" + digits[1:]  # Ruby reads a leading 0 as octal
    return sign * int(digits, 0)


@dataclass
class Details:
    """Istio's ``details`` service (v1: the book's details are built in)."""

    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    async def route(self, request: Request) -> Response:
        path = _path(request)
        if _mounted(path, "/health"):
            return json_response({"status": "Details is healthy"}, compact=True)
        if not _mounted(path, "/details"):
            return _not_found()
        parts = path.split("/")
        while parts and not parts[-1]:  # Ruby's split drops trailing empty fields
            parts.pop()
        product_id = ruby_integer(parts[-1]) if parts else None
        if product_id is None:
            return json_response({"error": "please provide numeric product id"}, 400, compact=True)
        if self.env.get("ENABLE_EXTERNAL_BOOK_SERVICE") == "true":
            # The details-v2 image asks www.googleapis.com; this stand-in does not.
            message = "the trustmesh stand-in does not fetch from the external book service"
            return json_response({"error": message}, 400, compact=True)
        return json_response(book_details(product_id), compact=True)


def _mounted(path: str, mount: str) -> bool:
    """WEBrick's mount match: the mount path itself or anything below it."""
    return path == mount or path.startswith(mount + "/")


def book_details(product_id: int) -> dict[str, object]:
    return {
        "id": product_id,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    }


# ---------------------------------------------------------------------------- ratings


_RATINGS_PATH = re.compile(r"^/ratings/[0-9]*")
_JS_INT = re.compile(r"\s*([-+]?[0-9]+)")
FAULTY_DELAY = 7.0


def js_parse_int(text: str) -> int | None:
    """JavaScript's ``parseInt(text)``: the leading integer, None for ``NaN``."""
    match = _JS_INT.match(text)
    return int(match.group(1)) if match else None


def _flipped(started: float, now: float, period: float) -> bool:
    """Whether a flag toggled every ``period`` seconds since ``started`` is now set."""
    return int((now - started) // period) % 2 == 1


@dataclass
class Ratings:
    """Istio's ``ratings`` service; ``clock`` and ``chance`` make its variants testable."""

    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    clock: Callable[[], float] = time.monotonic
    chance: Callable[[], float] = random.random
    added: dict[int, dict[str, object]] = field(default_factory=dict)
    started: float = field(default=-1.0)

    def __post_init__(self) -> None:
        if self.started < 0:
            self.started = self.clock()

    @property
    def version(self) -> str:
        return self.env.get("SERVICE_VERSION", "v1")

    def unavailable(self) -> bool:
        now = self.clock()
        if self.version == "v-unavailable":
            return _flipped(self.started, now, 60)
        if self.version == "v-unhealthy":
            return _flipped(self.started, now, 900)
        return False

    async def route(self, request: Request) -> Response:
        path = urlsplit(request.target).path
        if request.method in ("GET", "HEAD") and path == "/health":
            if self.version == "v-unhealthy" and self.unavailable():
                return json_response({"status": "Ratings is not healthy"}, 500, compact=True)
            return json_response({"status": "Ratings is healthy"}, compact=True)
        if not _RATINGS_PATH.match(request.target):
            return text_response("Page not found\n", 404)
        # Node's req.url keeps the query: Istio's app takes the last '/' field of it.
        product_id = js_parse_int(request.target.split("/")[-1])
        if request.method == "POST":
            return self._post(product_id, request.body)
        if request.method not in ("GET", "HEAD"):
            return text_response("Page not found\n", 404)
        if product_id is None:
            return json_response({"error": "please provide numeric product ID"}, 400, compact=True)
        if self.version == "v2":
            return self._from_database()
        if self.version == "v-faulty" and self.chance() <= 0.5:
            return _service_unavailable()
        if self.version == "v-delayed" and self.chance() <= 0.5:
            await asyncio.sleep(FAULTY_DELAY)  # the variant's whole point: a slow answer
        if self.unavailable():
            return _service_unavailable()
        return json_response(self.ratings(product_id), compact=True)

    def ratings(self, product_id: int) -> dict[str, object]:
        return self.added.get(
            product_id, {"id": product_id, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}
        )

    def _post(self, product_id: int | None, body: bytes) -> Response:
        if product_id is None:
            return json_response({"error": "please provide numeric product ID"}, 400, compact=True)
        try:
            ratings = json.loads(body)
        except ValueError:
            return json_response({"error": "please provide valid ratings JSON"}, 400, compact=True)
        if self.version == "v2":
            error = "Post not implemented for database backed ratings"
            return json_response({"error": error}, 501, compact=True)
        self.added[product_id] = {"id": product_id, "ratings": ratings}
        return json_response(self.ratings(product_id), compact=True)

    def _from_database(self) -> Response:
        # The v2 image reads MongoDB (or MySQL with DB_TYPE=mysql); no database runs here,
        # so it answers as the image does when the connection fails: MongoDB's path with
        # 500, MySQL's without setting a status (Node's default, 200).
        error = {"error": "could not connect to ratings database"}
        if self.env.get("DB_TYPE") == "mysql":
            return Response(200, json.dumps(error, separators=(",", ":")).encode(), "")
        return json_response(error, 500, compact=True)


def _service_unavailable() -> Response:
    return json_response({"error": "Service unavailable"}, 503, compact=True)


# ---------------------------------------------------------------------------- reviews


_REVIEWS_PATH = re.compile(r"/reviews/([-+]?[0-9]+)")
_JAVA_INT = (-(2**31), 2**31 - 1)
REVIEWS = (
    (
        "Reviewer1",
        "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!",
    ),
    (
        "Reviewer2",
        "Absolutely fun and entertaining. The play lacks thematic depth when compared to "
        "other plays by Shakespeare.",
    ),
)


@dataclass
class Reviews:
    """Istio's ``reviews`` service; its version is its environment (v1: no ratings, v2:
    ``ENABLE_RATINGS=true``, v3: also ``STAR_COLOR=red``)."""

    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    @property
    def ratings_enabled(self) -> bool:
        return self.env.get("ENABLE_RATINGS", "").lower() == "true"  # Java's Boolean.valueOf

    @property
    def star_color(self) -> str:
        return self.env.get("STAR_COLOR", "black")

    @property
    def ratings_timeout(self) -> float:
        # Istio's app: 10 s for black stars, 2.5 s otherwise (the timeout tasks use v3).
        return 10.0 if self.star_color == "black" else 2.5

    async def route(self, request: Request) -> Response:
        path = _path(request)
        if request.method not in ("GET", "HEAD"):
            return text_response("Method Not Allowed\n", 405)
        if path == "/health":
            return json_response({"status": "Reviews is healthy"}, compact=True)
        match = _REVIEWS_PATH.fullmatch(path)
        if match is None or not _JAVA_INT[0] <= int(match.group(1)) <= _JAVA_INT[1]:
            return _not_found()  # JAX-RS: a path parameter that is not an int matches nothing
        product_id = int(match.group(1))
        stars: dict[str, int] = {}
        if self.ratings_enabled:
            stars = await self._stars(product_id, request)
        return json_response(self.reviews(product_id, stars), compact=True)

    async def _stars(self, product_id: int, request: Request) -> dict[str, int]:
        url = f"{service_url(self.env, 'ratings')}/ratings/{product_id}"
        headers = [("Accept", "application/json"), *forwarded(request)]
        try:
            answer = await http_get(
                url, headers=headers, timeout=self.ratings_timeout, environ=self.env
            )
            if answer.status != 200:
                return {}
            body = answer.json()
        except (CallFailed, ValueError):
            return {}
        ratings = body.get("ratings") if isinstance(body, dict) else None
        if not isinstance(ratings, dict):
            return {}
        return {k: v for k, v in ratings.items() if isinstance(v, int) and not isinstance(v, bool)}

    def reviews(self, product_id: int, stars: Mapping[str, int]) -> dict[str, object]:
        """The answer for ``product_id`` given the ratings found (none: unavailable)."""
        reviews = []
        for reviewer, text in REVIEWS:
            review: dict[str, object] = {"reviewer": reviewer, "text": text}
            if self.ratings_enabled:
                count = stars.get(reviewer)
                review["rating"] = (
                    {"stars": count, "color": self.star_color}
                    if count is not None and count != -1
                    else {"error": RATINGS_UNAVAILABLE}
                )
            reviews.append(review)
        return {
            "id": str(product_id),
            # Java prints a missing variable as "null", and so does Istio's app here.
            "podname": self.env.get("HOSTNAME", "null"),
            "clustername": self.env.get("CLUSTER_NAME", "null"),
            "reviews": reviews,
        }
