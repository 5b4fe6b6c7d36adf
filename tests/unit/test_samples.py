"""The sample workloads over real loopback sockets: httpbin's routes and HTTP/1.1 framing,
tcp-echo's line protocol, and the ``trustmesh sample`` commands as processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from trustmesh.samples import httpbin, tcp_echo
from trustmesh.samples.httpbin import Request, encode_response, route

T = TypeVar("T")
LOOPBACK = "127.0.0.1"
# The CLI sub-app is invoked directly until trustmesh.cli.main registers it.
SAMPLE_CLI = "from trustmesh.cli.sample import app; app()"


def run(coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def running(
    serve: Callable[..., Coroutine[Any, Any, None]], **options: Any
) -> AsyncIterator[int]:
    """Run ``serve`` on 127.0.0.1:0 in a task; yield the bound port; stop it afterwards."""
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(LOOPBACK, 0, stop=stop, ready=lambda _h, p: bound.set_result(p), **options)
    )
    first: list[asyncio.Future[Any]] = [bound, task]
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises the bind error
    try:
        yield bound.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


class Client:
    """One raw HTTP/1.1 connection, so tests control framing and keep-alive exactly."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection(LOOPBACK, port))

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def response(self, *, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        status_line = await self.reader.readuntil(b"\r\n")
        status = int(status_line.split(b" ")[1])
        headers: dict[str, str] = {}
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.lower()] = value.strip()
        length = 0 if head else int(headers.get("content-length", "0"))
        return status, headers, await self.reader.readexactly(length)

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        await self.send(raw)
        return await self.response()

    async def closed_by_server(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 2) == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def get(path: str, *headers: str, host: str = "httpbin.test") -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *headers, "", ""]
    return "\r\n".join(lines).encode()


def test_get_echoes_args_headers_origin_and_url() -> None:
    async def body() -> None:
        async with running(httpbin.serve) as port:
            client = await Client.connect(port)
            status, headers, payload = await client.request(get("/get?a=1&a=2&b=", "X-Custom: v1"))
            await client.close()
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert int(headers["content-length"]) == len(payload)
        echo = json.loads(payload)
        assert echo == {
            "args": {"a": ["1", "2"], "b": ""},
            "headers": {"Host": "httpbin.test", "X-Custom": "v1"},
            "origin": LOOPBACK,
            "url": "http://httpbin.test/get?a=1&a=2&b=",
        }

    run(body())


def test_headers_are_title_case_and_repeats_joined_like_httpbin_org() -> None:
    async def body() -> None:
        async with running(httpbin.serve) as port:
            client = await Client.connect(port)
            status, _, payload = await client.request(
                get(
                    "/headers",
                    "x-jwt-claim-foo: bar",
                    "x-b3-traceid: 1",
                    "X-Multi: a",
                    "x-multi: b",
                )
            )
            await client.close()
        assert status == 200
        assert json.loads(payload)["headers"] == {
            "Host": "httpbin.test",
            "X-Jwt-Claim-Foo": "bar",
            "X-B3-Traceid": "1",
            "X-Multi": "a,b",
        }

    run(body())


def test_keep_alive_serves_sequential_requests_on_one_connection() -> None:
    async def body() -> None:
        async with running(httpbin.serve) as port:
            client = await Client.connect(port)
            first = await client.request(get("/headers"))
            second = await client.request(get("/ip", "X-Forwarded-For: 10.1.1.1, 10.2.2.2"))
            last = await client.request(get("/ip", "Connection: close"))
            closed = await client.closed_by_server()
            await client.close()
        assert first[0] == second[0] == last[0] == 200
        assert "connection" not in first[1] and "connection" not in second[1]
        assert json.loads(second[2]) == {"origin": "10.1.1.1"}  # first X-Forwarded-For hop
        assert json.loads(last[2]) == {"origin": LOOPBACK}
        assert last[1]["connection"] == "close" and closed

    run(body())


def test_http10_closes_unless_keep_alive_is_asked_for() -> None:
    async def body() -> None:
        async with running(httpbin.serve) as port:
            client = await Client.connect(port)
            kept = await client.request(b"GET /ip HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            again = await client.request(b"GET /ip HTTP/1.0\r\n\r\n")
            closed = await client.closed_by_server()
            await client.close()
        assert kept[0] == again[0] == 200
        assert kept[1]["connection"] == "keep-alive"
        assert again[1]["connection"] == "close" and closed

    run(body())


def test_status_returns_that_code_with_an_empty_body() -> None:
    async def body() -> None:
        async with running(httpbin.serve) as port:
            client = await Client.connect(port)
            teapot = await client.request(get("/status/418"))
            no_content = await client.request(
                b"POST /status/204 HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi"
            )
            invalid = await client.request(get("/status/99"))
            await client.close()
        assert teapot[0] == 418 and teapot[2] == b""
        assert teapot[1]["content-length"] == "0"
        assert no_content[0] == 204 and "content-length" not in no_content[1]  # RFC 9110 §8.6
        assert invalid[0] == 400

    run(body())


def test_post_echoes_a_json_body_and_a_chunked_form() -> None:
    async def body() -> None:
        document = json.dumps({"user": "alice", "n": [1, 2]}).encode()
        async with running(httpbin.serve) as port:
            client = await Client.connect(port)
            posted = await client.request(
                b"POST /post?x=1 HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(document), document)
            )
            # curl's shape for a large upload: wait for 100 Continue, then send chunks.
            await client.send(
                b"POST /post HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            interim = await client.reader.readuntil(b"\r\n\r\n")
            await client.send(b"4\r\na=1&\r\n3\r\nb=2\r\n0\r\n\r\n")
            form = await client.response()
            await client.close()
        assert posted[0] == 200
        echo = json.loads(posted[2])
        assert echo["json"] == {"user": "alice", "n": [1, 2]}
        assert echo["data"] == document.decode()
        assert echo["args"] == {"x": "1"} and echo["form"] == {}
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert form[0] == 200
        assert json.loads(form[2])["form"] == {"a": "1", "b": "2"}

    run(body())


def test_unknown_path_is_404_and_wrong_method_405() -> None:
    async def body() -> None:
        async with running(httpbin.serve) as port:
            client = await Client.connect(port)
            missing = await client.request(get("/nope"))
            wrong = await client.request(get("/post"))
            await client.close()
        assert missing[0] == 404
        assert wrong[0] == 405 and wrong[1]["allow"] == "POST"

    run(body())


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /get HTTP/9.9\r\n\r\n",
        b"GET /get HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /get HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"POST /post HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /post HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /post HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["request-line", "version", "header-colon", "header-name", "cl-and-te", "cl", "chunk"],
)
def test_malformed_request_is_400_and_closes(raw: bytes) -> None:
    async def body() -> None:
        async with running(httpbin.serve) as port:
            client = await Client.connect(port)
            status, headers, payload = await client.request(raw)
            closed = await client.closed_by_server()
            await client.close()
        assert status == 400
        assert headers["connection"] == "close" and closed
        assert "error" in json.loads(payload)

    run(body())


def test_route_anything_echoes_method_and_head_keeps_content_length() -> None:
    request = Request("DELETE", "/anything/x?q=1", "HTTP/1.1", (("Host", "h"),), b"raw", "10.0.0.9")
    echo = json.loads(route(request).body)
    assert echo["method"] == "DELETE" and echo["data"] == "raw" and echo["json"] is None
    assert echo["url"] == "http://h/anything/x?q=1" and echo["origin"] == "10.0.0.9"

    response = route(Request("HEAD", "/get", "HTTP/1.1", ()))
    head = encode_response(response, head=True)
    assert head.endswith(b"\r\n\r\n")
    assert f"Content-Length: {len(response.body)}".encode() in head


def test_tcp_echo_answers_each_line_with_the_prefix() -> None:
    async def body() -> None:
        async with running(tcp_echo.serve, prefix="hello") as port:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            answers = []
            for line in (b"world\n", b"again\n"):
                writer.write(line)
                await writer.drain()
                answers.append(await reader.readuntil(b"\n"))
            writer.write(b"tail")  # no newline: answered when the client half-closes
            writer.write_eof()
            rest = await reader.read()
            writer.close()
        assert answers == [b"hello world\n", b"hello again\n"]
        assert rest == b"hello tail"

    run(body())


def test_stopping_closes_idle_keep_alive_connections() -> None:
    async def body() -> bool:
        async with running(httpbin.serve) as port:
            client = await Client.connect(port)
            await client.request(get("/get"))
        # the server task has returned: the idle connection must be closed, not leaked
        closed = await client.closed_by_server()
        await client.close()
        return closed

    assert run(body())


async def _start_cli(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SAMPLE_CLI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )


async def _reap(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        await process.wait()


def test_cli_httpbin_honours_host_and_port_env_and_exits_0_on_sigterm() -> None:
    async def body() -> None:
        process = await _start_cli("httpbin", env={"HOST": LOOPBACK, "PORT": "0"})
        try:
            assert process.stdout is not None
            line = (await asyncio.wait_for(process.stdout.readline(), 5)).decode()
            assert line.startswith(f"listening on {LOOPBACK}:"), line
            client = await Client.connect(int(line.rsplit(":", 1)[1]))
            status, _, payload = await client.request(get("/headers", "X-Jwt-Claim-Foo: bar"))
            await client.close()
            assert status == 200 and json.loads(payload)["headers"]["X-Jwt-Claim-Foo"] == "bar"
            os.kill(process.pid, signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 5) == 0
            assert await process.stdout.read() == b""  # exactly one line printed
        finally:
            await _reap(process)

    run(body(), timeout=20)


def test_cli_tcp_echo_takes_options() -> None:
    async def body() -> None:
        process = await _start_cli(
            "tcp-echo", "--host", LOOPBACK, "--port", "0", "--prefix", "hi", env={}
        )
        try:
            assert process.stdout is not None
            line = (await asyncio.wait_for(process.stdout.readline(), 5)).decode()
            reader, writer = await asyncio.open_connection(LOOPBACK, int(line.rsplit(":", 1)[1]))
            writer.write(b"there\n")
            assert await reader.readuntil(b"\n") == b"hi there\n"
            writer.close()
            os.kill(process.pid, signal.SIGINT)
            assert await asyncio.wait_for(process.wait(), 5) == 0
        finally:
            await _reap(process)

    run(body(), timeout=20)


def _catches_sigterm(pid: int) -> bool:
    # /proc/PID/status SigCgt is the mask of signals with a handler installed.
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("SigCgt:"):
            return bool(int(row.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_cli_sleep_is_silent_and_exits_0_on_sigterm() -> None:
    async def body() -> None:
        process = await _start_cli("sleep", env={"PORT": "8000"})
        try:
            # sleep prints nothing, so wait until its SIGTERM handler is installed
            for _ in range(200):
                if _catches_sigterm(process.pid):
                    break
                await asyncio.sleep(0.025)
            os.kill(process.pid, signal.SIGTERM)
            stdout, stderr = await asyncio.wait_for(process.communicate(), 5)
            assert process.returncode == 0, stderr
            assert stdout == b""
        finally:
            await _reap(process)

    run(body(), timeout=20)
