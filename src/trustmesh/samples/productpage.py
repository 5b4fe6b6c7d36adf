"""A stand-in for Istio's bookinfo ``productpage``: the page that calls details and reviews.

``GET /productpage`` calls ``http://details<.SERVICES_DOMAIN>:9080/details/0`` and
``http://reviews<.SERVICES_DOMAIN>:9080/reviews/0`` (``DETAILS_HOSTNAME``,
``REVIEWS_HOSTNAME``, ``*_SERVICE_PORT`` as in Istio's app), 3 s each, reviews tried
twice, forwarding the tracing and identity headers, and renders one HTML page: the book,
its details table, and each review with its stars (``glyphicon-star`` / ``-empty`` in the
review's colour) or the rating's error. A failed call shows Istio's own texts: "Error
fetching product details" + "Sorry, product details are currently unavailable for this
book.", "Error fetching product reviews" + "Sorry, product reviews are currently
unavailable for this book.", and per review the reviews service's "Ratings service is
currently unavailable".

Also as in Istio's app: ``/`` and ``/index.html`` (the service graph), ``/health``,
``POST /login`` (form ``username``; kept in the ``session`` cookie, then sent to reviews as
``end-user``), ``/logout``, ``/api/v1/products[/<id>[/reviews|/ratings]]`` (JSON, the
upstream status passed on), ``/metrics`` (calls per destination and status), and
``FLOOD_FACTOR`` extra reviews calls per page (Istio's rate-limiting demo).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import html
import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from trustmesh.samples.bookinfo import PROPAGATED_HEADERS, forwarded, service_url
from trustmesh.samples.http1 import Request, Response, json_response, text_response
from trustmesh.samples.outbound import CallFailed, http_get

__all__ = [
    "DETAILS_ERROR",
    "DETAILS_UNAVAILABLE",
    "RATINGS_UNAVAILABLE_FOR_BOOK",
    "REVIEWS_ERROR",
    "REVIEWS_UNAVAILABLE",
    "ProductPage",
    "render_page",
]

DETAILS_ERROR = "Error fetching product details"
REVIEWS_ERROR = "Error fetching product reviews"
DETAILS_UNAVAILABLE = "Sorry, product details are currently unavailable for this book."
REVIEWS_UNAVAILABLE = "Sorry, product reviews are currently unavailable for this book."
RATINGS_UNAVAILABLE_FOR_BOOK = "Sorry, product ratings are currently unavailable for this book."
CALL_TIMEOUT = 3.0
REVIEWS_ATTEMPTS = 2  # Istio's app retries reviews once, on purpose (fault-injection task)
SESSION_COOKIE = "session"

PRODUCTS = (
    {
        "id": 0,
        "title": "The Comedy of Errors",
        "descriptionHtml": (
            '<a href="https://en.wikipedia.org/wiki/The_Comedy_of_Errors">Wikipedia Summary</a>:'
            " The Comedy of Errors is one of <b>William Shakespeare's</b> early plays. It is"
            " his shortest and one of his most farcical comedies, with a major part of the"
            " humour coming from slapstick and mistaken identity, in addition to puns and word"
            " play."
        ),
    },
)

# productpage forwards B3 through OpenTelemetry's propagator, which re-injects the trace,
# span and sampling fields it extracted but not x-b3-parentspanid; end-user comes from
# its session, not from the request.
_FORWARDED = tuple(h for h in PROPAGATED_HEADERS if h not in ("x-b3-parentspanid", "end-user"))


@dataclass
class ProductPage:
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    results: Counter[tuple[str, int]] = field(default_factory=Counter)

    @property
    def flood_factor(self) -> int:
        text = self.env.get("FLOOD_FACTOR", "0")
        return int(text) if text.strip().isdigit() else 0

    async def route(self, request: Request) -> Response:
        parts = urlsplit(request.target)
        path = parts.path
        method = "GET" if request.method == "HEAD" else request.method
        if path == "/login":
            return self._login(request) if method == "POST" else _not_allowed("POST")
        if method != "GET":
            return _not_allowed("GET, HEAD")
        if path in ("/", "/index.html"):
            return _html(render_index(self.env))
        if path == "/health":
            return Response(200, b"Product page is healthy", "text/html; charset=utf-8")
        if path == "/logout":
            return _redirect(request, session_user=None)
        if path == "/productpage":
            return _html(await self.page(request))
        if path == "/metrics":
            return text_response(self._metrics())
        return await self._api(path, request)

    async def page(self, request: Request) -> str:
        user = session_user(request)
        headers = self._headers(request, user)
        details_status, details = await self.details(0, headers)
        if self.flood_factor > 0:
            flood = (self.reviews(0, headers) for _ in range(self.flood_factor))
            await asyncio.gather(*flood)
        reviews_status, reviews = await self.reviews(0, headers)
        return render_page(PRODUCTS[0], details_status, details, reviews_status, reviews, user)

    def _headers(self, request: Request, user: str | None) -> list[tuple[str, str]]:
        headers = forwarded(request, _FORWARDED)
        if user is not None:
            headers.append(("end-user", user))
        return headers

    async def _call(
        self, service: str, product_id: object, headers: list[tuple[str, str]], sorry: str
    ) -> tuple[int, object]:
        url = f"{service_url(self.env, service)}/{service}/{product_id}"
        try:
            answer = await http_get(url, headers=headers, timeout=CALL_TIMEOUT, environ=self.env)
        except CallFailed:
            self.results[(service, 500)] += 1
            return 500, {"error": sorry}
        if answer.status == 200:
            self.results[(service, 200)] += 1
            return 200, answer.json()
        self.results[(service, answer.status)] += 1
        return answer.status, {"error": sorry}

    async def details(
        self, product_id: object, headers: list[tuple[str, str]]
    ) -> tuple[int, object]:
        return await self._call("details", product_id, headers, DETAILS_UNAVAILABLE)

    async def reviews(
        self, product_id: object, headers: list[tuple[str, str]]
    ) -> tuple[int, object]:
        status, body = 500, object()
        for _ in range(REVIEWS_ATTEMPTS):
            status, body = await self._call("reviews", product_id, headers, REVIEWS_UNAVAILABLE)
            if status == 200:
                break
        return status, body

    async def _api(self, path: str, request: Request) -> Response:
        parts = path.split("/")  # "", api, v1, products, <id>, <what>
        if parts[:4] != ["", "api", "v1", "products"] or len(parts) > 6:
            return text_response("Not Found\n", 404, "text/html")
        if len(parts) == 4:
            return json_response(list(PRODUCTS), compact=True)
        product_id = parts[4]
        if not product_id:
            return text_response("Not Found\n", 404, "text/html")
        headers = self._headers(request, session_user(request))
        what = parts[5] if len(parts) == 6 else "details"
        if what == "details" and len(parts) == 5:
            status, body = await self.details(product_id, headers)
        elif what == "reviews":
            status, body = await self.reviews(product_id, headers)
        elif what == "ratings":
            status, body = await self._call(
                "ratings", product_id, headers, RATINGS_UNAVAILABLE_FOR_BOOK
            )
        else:
            return text_response("Not Found\n", 404, "text/html")
        return json_response(body, status, compact=True)

    def _login(self, request: Request) -> Response:
        form = dict(parse_qsl(urlsplit(request.target).query))
        if (request.header("content-type") or "").startswith("application/x-www-form-urlencoded"):
            form |= dict(parse_qsl(request.body.decode("utf-8", "replace")))
        return _redirect(request, session_user=form.get("username"), login=True)

    def _metrics(self) -> str:
        lines = [
            "# HELP request_result_total Results of requests",
            "# TYPE request_result_total counter",
        ]
        for (app, code), count in sorted(self.results.items()):
            lines.append(
                f'request_result_total{{destination_app="{app}",response_code="{code}"}} '
                f"{float(count)}"
            )
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- session


def session_user(request: Request) -> str | None:
    """The user of the ``session`` cookie. Flask's cookie is ``<base64 JSON>.<time>.<sig>``;
    its payload is read the same way (the sample's key is public: nothing to verify)."""
    for part in (request.header("cookie") or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name != SESSION_COOKIE or not value:
            continue
        payload = value.split(".")[0]
        try:
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (ValueError, binascii.Error):
            return None
        user = data.get("user") if isinstance(data, dict) else None
        return user if isinstance(user, str) else None
    return None


def _redirect(request: Request, *, session_user: str | None, login: bool = False) -> Response:
    if login and session_user is not None:
        payload = base64.urlsafe_b64encode(json.dumps({"user": session_user}).encode())
        cookie = f"{SESSION_COOKIE}={payload.decode().rstrip('=')}; HttpOnly; Path=/"
    else:
        cookie = f"{SESSION_COOKIE}=; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; Path=/"
    location = request.header("referer") or "/productpage"
    return Response(302, b"", "", (("Location", location), ("Set-Cookie", cookie)))


def _not_allowed(allow: str) -> Response:
    return Response(405, b"Method Not Allowed\n", "text/html; charset=utf-8", (("Allow", allow),))


def _html(text: str) -> Response:
    return Response(200, text.encode(), "text/html; charset=utf-8")


# ---------------------------------------------------------------------------- pages


def render_index(env: Mapping[str, str]) -> str:
    details, ratings = service_url(env, "details"), service_url(env, "ratings")
    reviews = service_url(env, "reviews")
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(url)}</td>"
        f"<td>{html.escape(calls)}</td></tr>"
        for name, url, calls in (
            ("productpage", "", "details, reviews"),
            ("details", details, ""),
            ("reviews", reviews, "ratings"),
            ("ratings", ratings, ""),
        )
    )
    return _document(
        "<h3>Hello! This is a simple bookstore application consisting of three services"
        " as shown below</h3>"
        f'<table class="table"><tr><th>service</th><th>address</th><th>calls</th></tr>{rows}'
        "</table><ul>"
        '<li><a href="/productpage?u=normal">Normal user</a></li>'
        '<li><a href="/productpage?u=test">Test user</a></li></ul>'
    )


def render_page(
    product: Mapping[str, object],
    details_status: int,
    details: object,
    reviews_status: int,
    reviews: object,
    user: str | None,
) -> str:
    """The product page: Istio's sections and texts, this project's own markup."""
    e = html.escape
    out = [
        '<nav><a href="#">BookInfo Sample</a> ',
        f'<span class="user">{e(user)}</span> <a href="logout">Sign out</a>'
        if user
        else '<form method="post" action="login"><input name="username">'
        '<input name="passwd" type="password"><button type="submit">Sign in</button></form>',
        "</nav>",
        f"<h1>{e(str(product['title']))}</h1>",
        # Istio's template renders the description unescaped: it is the app's own HTML.
        f"<p>{product['descriptionHtml']}</p>",
        '<div class="details">',
    ]
    info = details if isinstance(details, dict) else {}
    if details_status == 200:
        columns = ("ISBN-10", "Publisher", "Pages", "Type", "Language")
        keys = ("ISBN-10", "publisher", "pages", "type", "language")
        out.append("<h4>Book Details</h4><table><tr>")
        out += [f"<th>{name}</th>" for name in columns]
        out.append("</tr><tr>")
        out += [f"<td>{e(_text(info.get(key)))}</td>" for key in keys]
        out.append("</tr></table>")
    else:
        out.append(f'<p class="error">{DETAILS_ERROR}</p>')
        if info:
            out.append(f"<p>{e(_text(info.get('error')))}</p>")
    out.append('</div><div class="reviews">')
    answer = reviews if isinstance(reviews, dict) else {}
    if reviews_status == 200:
        out.append("<h4>Book Reviews</h4>")
        listed = answer.get("reviews")
        for review in listed if isinstance(listed, list) else []:
            if isinstance(review, dict):
                out.append(_review(review, answer))
    else:
        out.append(f'<p class="error">{REVIEWS_ERROR}</p>')
        if answer:
            out.append(f"<p>{e(_text(answer.get('error')))}</p>")
    out.append("</div>")
    return _document("\n".join(out))


def _review(review: Mapping[str, object], answer: Mapping[str, object]) -> str:
    e = html.escape
    out = ['<section class="review">']
    rating = review.get("rating")
    if isinstance(rating, dict) and rating:
        stars = rating.get("stars")
        if isinstance(stars, int) and not isinstance(stars, bool) and stars:
            color = e(_text(rating.get("color")))
            shown = max(0, min(stars, 5))
            glyphs = '<span class="glyphicon glyphicon-star">&#9733;</span>' * shown
            glyphs += '<span class="glyphicon glyphicon-star-empty">&#9734;</span>' * (5 - shown)
            out.append(f'<div class="stars text-{color}-500" style="color: {color}">{glyphs}</div>')
        elif rating.get("error"):
            out.append(f'<p class="rating-error">{e(_text(rating["error"]))}</p>')
    out.append(f'<blockquote><p>"{e(_text(review.get("text")))}"</p></blockquote>')
    served = f"Reviews served by: {e(_text(answer.get('podname')))}"
    cluster = answer.get("clustername")
    if cluster != "null":
        served += f" on cluster {e(_text(cluster))}"
    out.append(f"<div><b>{e(_text(review.get('reviewer')))}</b> <small>{served}</small></div>")
    out.append("</section>")
    return "".join(out)


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _document(body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        "<title>Simple Bookstore App</title></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )
