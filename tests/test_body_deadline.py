"""A request body that trickles in is cut off at --body-timeout-s, in the dialect's envelope;
request headers that trickle in close the connection at --header-timeout-s."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from tests.fakes import FakeRunner, engine_factory
from tests.serving import live_server

SD_XL = "/rpc/2.0/ai_custom/v1/wenxinworkshop/text2image/sd_xl"


def _post_part_of_a_body(url: str, path: str) -> tuple[int, dict, bytes]:
    """Send headers announcing 500 bytes and only 20 of them; the answer's status, body, head."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 500\r\n\r\n".encode() + b'{"prompt": "a lighthous')
        raw = b""
        # Generous: the answer is due about one second after the headers.
        while b"\r\n\r\n" not in raw or len(raw.partition(b"\r\n\r\n")[2]) < _length(raw):
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection without an answer: {raw!r}"
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), head.lower()


def _length(raw: bytes) -> int:
    for line in raw.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("strict"), body_timeout_s=1, header_timeout_s=1,
                     engine_factory=engine_factory(FakeRunner(delay=3.0))) as live:
        yield live


def test_a_body_that_never_completes_gets_a_408_in_the_openai_envelope(strict):
    status, body, head = _post_part_of_a_body(strict.url, "/v1/images/generations")
    assert status == 408
    assert body["error"]["message"] == "the request body did not arrive within 1 s"
    assert body["error"]["type"] == "invalid_request_error"
    # Closed, not kept alive: else the server would go on reading what the client trickles.
    assert b"\r\nconnection: close" in head


def test_baidu_gets_the_same_cut_off_in_its_own_envelope(strict):
    status, body, head = _post_part_of_a_body(strict.url, SD_XL)
    assert status == 200  # Baidu's SDKs read errors from 200 answers
    assert b"\r\nconnection: close" in head
    assert body["error_msg"].endswith("the request body did not arrive within 1 s")
    assert isinstance(body["error_code"], int)


def test_generating_longer_than_the_body_deadline_is_not_cut_off(strict):
    # The fake runner takes 3 s, the body deadline is 1 s: only the body is timed.
    client = openai.OpenAI(base_url=strict.url + "/v1", api_key="unused", max_retries=0,
                           timeout=120)
    result = client.images.generate(prompt="a lighthouse", size="64x64",
                                    response_format="b64_json")
    assert len(result.data) == 1 and result.data[0].b64_json


def test_requests_whose_body_was_read_keep_their_connection(strict):
    with httpx.Client(base_url=strict.url, timeout=120) as client:
        health = client.get("/health")
        made = client.post("/v1/images/generations",
                           json={"prompt": "a lighthouse", "size": "64x64"})
    assert health.status_code == 200 and made.status_code == 200, made.text
    assert "close" not in health.headers.get("connection", "")
    assert "close" not in made.headers.get("connection", "")


def _trickle_headers_until_closed(sock: socket.socket, began: float, limit_s: float = 60
                                  ) -> float:
    """Send a header byte every 0.2 s until the server closes; seconds since ``began``.

    Fails once ``limit_s`` have passed with the connection still open.
    """
    sock.settimeout(0.2)
    while time.monotonic() - began < limit_s:
        try:
            sock.sendall(b"X")
            if sock.recv(65536) == b"":
                return time.monotonic() - began
        except TimeoutError:
            continue
        except OSError:  # reset by the close
            return time.monotonic() - began
    raise AssertionError(f"the connection was still open after {limit_s:g}s of trickled headers")


def test_headers_that_trickle_in_close_the_connection(strict):
    host, port = strict.url.removeprefix("http://").split(":")
    began = time.monotonic()  # before the server can have seen the connection
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert _trickle_headers_until_closed(sock, began) >= 0.99  # the 1 s deadline, not before


def test_a_kept_alive_connection_has_the_same_deadline_for_its_next_headers(strict):
    host, port = strict.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        began = time.monotonic()  # before the first response can have ended
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = b""
        while b"\r\n\r\n" not in raw or len(raw.partition(b"\r\n\r\n")[2]) < _length(raw):
            chunk = sock.recv(65536)
            assert chunk, f"closed before the first answer: {raw!r}"
            raw += chunk
        assert raw.startswith(b"HTTP/1.1 200"), raw
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert _trickle_headers_until_closed(sock, began) >= 0.99
