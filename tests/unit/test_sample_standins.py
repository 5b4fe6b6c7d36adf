"""The stand-ins for Istio's sample images over real loopback sockets: helloworld, bookinfo's
details / ratings / reviews / productpage calling each other by name (directly, or through
an HTTP proxy as process mode's sidecar is), Istio's texts when a call fails, and the
headers they forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.unit.test_samples import LOOPBACK, run
from trustmesh.samples import bookinfo, productpage
from trustmesh.samples.bookinfo import Details, Ratings, Reviews, js_parse_int, ruby_integer
from trustmesh.samples.helloworld import HelloWorld
from trustmesh.samples.http1 import Request, Response, Router, serve_http
from trustmesh.samples.outbound import CallFailed, http_get, proxy_for
from trustmesh.samples.productpage import ProductPage

STARS = re.compile(r'<div class="stars text-(\w+)-500"[^>]*>(.*?)</div>')


@contextlib.asynccontextmanager
async def serving(router: Router) -> AsyncIterator[int]:
    """``router`` on 127.0.0.1 at a free port, stopped afterwards."""
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve_http(router, LOOPBACK, 0, stop=stop, ready=lambda _h, p: bound.set_result(p))
    )
    await asyncio.wait([bound, task], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    try:
        yield bound.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def get(port: int, path: str, headers: list[tuple[str, str]] | None = None) -> Any:
    return await http_get(f"http://{LOOPBACK}:{port}{path}", headers=headers or [], environ={})


def recorder(router: Router, seen: list[Request]) -> Router:
    async def record(request: Request) -> Response:
        seen.append(request)
        return await router(request)

    return record


def env_for(**services: int) -> dict[str, str]:
    """The environment pointing bookinfo's apps at loopback ports instead of names."""
    env: dict[str, str] = {}
    for name, port in services.items():
        env[f"{name.upper()}_HOSTNAME"] = LOOPBACK
        env[f"{name.upper()}_SERVICE_PORT"] = str(port)
    return env


# ---------------------------------------------------------------------------- helloworld


def test_helloworld_answers_its_version_and_instance() -> None:
    async def scenario() -> None:
        app = HelloWorld({"SERVICE_VERSION": "v2", "HOSTNAME": "helloworld-v2-7d8f"})
        async with serving(app.route) as port:
            hello = await get(port, "/hello")
            assert (hello.status, hello.body) == (
                200,
                b"Hello version: v2, instance: helloworld-v2-7d8f\n",
            )
            health = await get(port, "/health")
            assert (health.status, health.body) == (200, b"Helloworld is healthy")
            assert (await get(port, "/nope")).status == 404

    run(scenario())


# ---------------------------------------------------------------------------- details, ratings


def test_details_answers_the_book_and_refuses_an_id_that_is_not_an_integer() -> None:
    async def scenario() -> None:
        async with serving(Details({}).route) as port:
            answer = await get(port, "/details/0")
            assert answer.status == 200
            assert answer.json() == {
                "id": 0,
                "author": "William Shakespeare",
                "year": 1595,
                "type": "paperback",
                "pages": 200,
                "publisher": "PublisherA",
                "language": "English",
                "ISBN-10": "1234567890",
                "ISBN-13": "123-1234567890",
            }
            assert (await get(port, "/details/0x10")).json()["id"] == 16  # Ruby's Integer()
            bad = await get(port, "/details/abc")
            assert (bad.status, bad.json()) == (400, {"error": "please provide numeric product id"})
            health = await get(port, "/health")
            assert health.json() == {"status": "Details is healthy"}
            assert (await get(port, "/detailsx/0")).status == 404

    run(scenario())


def test_integer_parsing_follows_ruby_and_javascript() -> None:
    assert [ruby_integer(t) for t in ("0", " 12 ", "010", "0b11", "1_000", "1.5", "", "x")] == [
        0,
        12,
        8,
        3,
        1000,
        None,
        None,
        None,
    ]
    assert [js_parse_int(t) for t in ("0", "12abc", "0?x=1", "abc", "")] == [0, 12, 0, None, None]


def test_ratings_answers_stars_stores_posts_and_plays_istios_variants() -> None:
    async def scenario() -> None:
        ratings = Ratings({})
        async with serving(ratings.route) as port:
            answer = await get(port, "/ratings/0")
            assert answer.body == b'{"id":0,"ratings":{"Reviewer1":5,"Reviewer2":4}}'
            bad = await get(port, "/ratings/abc")
            assert (bad.status, bad.json()) == (400, {"error": "please provide numeric product ID"})
            assert (await get(port, "/health")).json() == {"status": "Ratings is healthy"}
        posted = await ratings.route(
            Request("POST", "/ratings/7", "HTTP/1.1", (), b'{"Reviewer1": 1, "Reviewer2": 2}')
        )
        assert json.loads(posted.body) == {"id": 7, "ratings": {"Reviewer1": 1, "Reviewer2": 2}}
        again = await ratings.route(Request("GET", "/ratings/7", "HTTP/1.1", ()))
        assert json.loads(again.body)["ratings"] == {"Reviewer1": 1, "Reviewer2": 2}

        # v-unavailable: 503 every other minute (an injected clock, not a wait).
        now = [1000.0]
        flaky = Ratings({"SERVICE_VERSION": "v-unavailable"}, clock=lambda: now[0])
        assert (await flaky.route(Request("GET", "/ratings/0", "HTTP/1.1", ()))).status == 200
        now[0] += 61
        assert (await flaky.route(Request("GET", "/ratings/0", "HTTP/1.1", ()))).status == 503
        faulty = Ratings({"SERVICE_VERSION": "v-faulty"}, chance=lambda: 0.3)
        assert (await faulty.route(Request("GET", "/ratings/0", "HTTP/1.1", ()))).status == 503
        database = Ratings({"SERVICE_VERSION": "v2"})
        failed = await database.route(Request("GET", "/ratings/0", "HTTP/1.1", ()))
        assert failed.status == 500 and b"could not connect to ratings database" in failed.body

    run(scenario())


# ---------------------------------------------------------------------------- reviews


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),  # v1: no ratings at all
        ({"ENABLE_RATINGS": "true"}, "black"),  # v2
        ({"ENABLE_RATINGS": "true", "STAR_COLOR": "red"}, "red"),  # v3
    ],
)
def test_reviews_versions_call_ratings_and_add_stars(
    env: dict[str, str], expected: str | None
) -> None:
    async def scenario() -> None:
        calls: list[Request] = []
        async with serving(recorder(Ratings({}).route, calls)) as ratings_port:
            reviews = Reviews({**env, **env_for(ratings=ratings_port), "HOSTNAME": "reviews-x"})
            async with serving(reviews.route) as port:
                answer = await get(
                    port, "/reviews/0", [("x-request-id", "r-1"), ("x-b3-traceid", "abc")]
                )
        body = answer.json()
        assert answer.status == 200 and body["id"] == "0" and body["podname"] == "reviews-x"
        assert body["clustername"] == "null"
        assert [r["reviewer"] for r in body["reviews"]] == ["Reviewer1", "Reviewer2"]
        if expected is None:
            assert calls == [] and all("rating" not in r for r in body["reviews"])
            return
        (call,) = calls
        assert call.target == "/ratings/0"
        assert (call.header("x-request-id"), call.header("x-b3-traceid")) == ("r-1", "abc")
        assert [r["rating"] for r in body["reviews"]] == [
            {"stars": 5, "color": expected},
            {"stars": 4, "color": expected},
        ]

    run(scenario())


def test_reviews_says_ratings_are_unavailable_when_ratings_refuses_or_is_gone() -> None:
    async def denied(_request: Request) -> Response:
        return Response(403, b"RBAC: access denied", "text/plain")

    async def scenario() -> None:
        async with serving(denied) as ratings_port:
            reviews = Reviews({"ENABLE_RATINGS": "true", **env_for(ratings=ratings_port)})
            async with serving(reviews.route) as port:
                refused = (await get(port, "/reviews/0")).json()
        gone = Reviews({"ENABLE_RATINGS": "true", **env_for(ratings=ratings_port)})
        async with serving(gone.route) as port:  # nothing listens on ratings' port now
            unreachable = (await get(port, "/reviews/0")).json()
        for body in (refused, unreachable):
            assert [r["rating"] for r in body["reviews"]] == [
                {"error": "Ratings service is currently unavailable"}
            ] * 2

    run(scenario())


# ---------------------------------------------------------------------------- productpage


async def _bookinfo(
    check: Callable[[int, list[Request]], Awaitable[None]],
    *,
    reviews_env: dict[str, str],
    ratings: Router | None = None,
) -> None:
    """details, ratings, reviews and productpage on loopback ports, wired by environment."""
    seen: list[Request] = []
    async with (
        serving(recorder(Details({}).route, seen)) as details_port,
        serving(recorder(ratings or Ratings({}).route, seen)) as ratings_port,
    ):
        reviews = Reviews(
            {**reviews_env, **env_for(ratings=ratings_port), "HOSTNAME": "reviews-v9"}
        )
        async with serving(recorder(reviews.route, seen)) as reviews_port:
            page = ProductPage(env_for(details=details_port, reviews=reviews_port))
            async with serving(page.route) as port:
                await check(port, seen)


def test_productpage_shows_details_reviews_and_stars_and_forwards_trace_headers() -> None:
    async def check(port: int, seen: list[Request]) -> None:
        trace = [("x-request-id", "req-9"), ("x-b3-traceid", "t1"), ("x-b3-spanid", "s1")]
        trace += [("x-b3-parentspanid", "p0"), ("traceparent", "00-ab-cd-01"), ("cookie", "a=b")]
        answer = await get(port, "/productpage", trace)
        page = answer.body.decode()
        assert answer.status == 200 and answer.header("content-type").startswith("text/html")
        assert "The Comedy of Errors" in page and "Book Details" in page
        assert "PublisherA" in page and "Book Reviews" in page
        assert "An extremely entertaining play by Shakespeare." in page
        assert "Reviews served by: reviews-v9" in page
        stars = STARS.findall(page)
        assert [(color, body.count('glyphicon-star"')) for color, body in stars] == [
            ("red", 5),
            ("red", 4),
        ]
        assert "unavailable" not in page and "Error fetching" not in page
        by_path = {r.target: r for r in seen}
        assert set(by_path) == {"/details/0", "/reviews/0", "/ratings/0"}
        for request in by_path.values():  # every hop carries the trace
            assert request.header("x-request-id") == "req-9"
            assert request.header("traceparent") == "00-ab-cd-01"
            assert request.header("x-b3-traceid") == "t1" and request.header("cookie") == "a=b"
        # OpenTelemetry's B3 propagator in productpage does not pass the parent span on.
        assert by_path["/details/0"].header("x-b3-parentspanid") is None
        assert by_path["/ratings/0"].header("x-b3-parentspanid") is None

    run(_bookinfo(check, reviews_env={"ENABLE_RATINGS": "true", "STAR_COLOR": "red"}))


def test_productpage_shows_istios_texts_when_ratings_is_denied() -> None:
    async def denied(_request: Request) -> Response:
        return Response(403, b"RBAC: access denied", "text/plain")

    async def check(port: int, _seen: list[Request]) -> None:
        page = (await get(port, "/productpage")).body.decode()
        assert page.count("Ratings service is currently unavailable") == 2
        assert "glyphicon-star" not in page and "Book Reviews" in page

    run(_bookinfo(check, reviews_env={"ENABLE_RATINGS": "true"}, ratings=denied))


def test_productpage_shows_istios_texts_when_details_and_reviews_fail() -> None:
    async def scenario() -> None:
        closed = []
        for _ in range(2):  # two ports nothing listens on
            async with serving(Details({}).route) as port:
                closed.append(port)
        page_app = ProductPage(env_for(details=closed[0], reviews=closed[1]))
        async with serving(page_app.route) as port:
            page = (await get(port, "/productpage")).body.decode()
            metrics = (await get(port, "/metrics")).body.decode()
        assert productpage.DETAILS_ERROR in page and productpage.DETAILS_UNAVAILABLE in page
        assert productpage.REVIEWS_ERROR in page and productpage.REVIEWS_UNAVAILABLE in page
        assert page_app.results[("reviews", 500)] == 2  # Istio's app tries reviews twice
        assert 'request_result_total{destination_app="details",response_code="500"} 1.0' in metrics

    run(scenario())
    assert productpage.DETAILS_ERROR == "Error fetching product details"
    assert productpage.REVIEWS_UNAVAILABLE == (
        "Sorry, product reviews are currently unavailable for this book."
    )


def test_productpage_login_sends_end_user_to_reviews() -> None:
    # /login is POST in Istio's app; a GET is refused, the form POST works.
    async def post_check(port: int, seen: list[Request]) -> None:
        assert (await get(port, "/login")).status == 405
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        body = b"username=jason&passwd=x"
        writer.write(
            b"POST /login HTTP/1.1\r\nHost: x\r\nReferer: /productpage\r\nConnection: close\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 302") and b"Set-Cookie: session=" in answer
        cookie = answer.split(b"Set-Cookie: ")[1].split(b";")[0].decode()
        page = (await get(port, "/productpage", [("cookie", cookie)])).body.decode()
        assert '<span class="user">jason</span>' in page
        assert [r.header("end-user") for r in seen if r.target == "/reviews/0"] == ["jason"]

    run(_bookinfo(post_check, reviews_env={}))


def test_an_app_calls_by_name_through_http_proxy_when_set() -> None:
    """Process mode: HTTP_PROXY is the sidecar's outbound listener; the app sends the
    absolute-form target there, Host = the service's name."""

    async def scenario() -> None:
        seen: list[Request] = []

        async def proxy(request: Request) -> Response:
            seen.append(request)
            return Response(200, b'{"ratings": {"Reviewer1": 3, "Reviewer2": 1}}')

        async with serving(proxy) as proxy_port:
            env = {"HTTP_PROXY": f"http://{LOOPBACK}:{proxy_port}"}
            answer = await http_get("http://ratings:9080/ratings/0", environ=env)
            assert answer.json() == {"ratings": {"Reviewer1": 3, "Reviewer2": 1}}
            reviews = Reviews({"ENABLE_RATINGS": "true", **env})  # its environment: its proxy
            reviewed = await reviews.route(Request("GET", "/reviews/0", "HTTP/1.1", ()))
            body = json.loads(reviewed.body)
        assert [r.target for r in seen] == [
            "http://ratings:9080/ratings/0",
            "http://ratings:9080/ratings/0",
        ]
        assert seen[0].header("host") == "ratings:9080"
        assert [r["rating"]["stars"] for r in body["reviews"]] == [3, 1]

    run(scenario())


def test_proxy_selection_follows_curl_and_requests() -> None:
    proxy = {"HTTP_PROXY": "http://127.0.0.3:15001"}
    assert proxy_for("http://reviews:9080/", proxy) == ("127.0.0.3", 15001)
    assert proxy_for("http://reviews:9080/", {}) is None
    assert proxy_for("http://reviews:9080/", {**proxy, "http_proxy": "http://10.0.0.1:3128"}) == (
        "10.0.0.1",
        3128,
    )
    for no_proxy in ("reviews", ".reviews", "*", "reviews:9080", "10.0.0.0/8, other"):
        url = "http://10.1.2.3:9080/" if "/" in no_proxy else "http://reviews:9080/"
        assert proxy_for(url, {**proxy, "NO_PROXY": no_proxy}) is None, no_proxy
    assert proxy_for("http://reviews:9080/", {**proxy, "NO_PROXY": "reviews:80,views"}) is not None


def test_a_failed_call_is_an_error_not_an_answer() -> None:
    async def scenario() -> None:
        async with serving(Details({}).route) as port:
            pass  # stopped: nothing listens there any more
        with pytest.raises(CallFailed, match=f"{port}"):
            await get(port, "/details/0")

    run(scenario())


def test_service_urls_are_built_as_bookinfos_apps_build_them() -> None:
    assert bookinfo.service_url({}, "ratings") == "http://ratings:9080"
    assert (
        bookinfo.service_url({"SERVICES_DOMAIN": "svc.cluster.local"}, "ratings")
        == "http://ratings.svc.cluster.local:9080"
    )
    env = {"RATINGS_HOSTNAME": "stars", "RATINGS_SERVICE_PORT": "8080"}
    assert bookinfo.service_url(env, "ratings") == "http://stars:8080"
