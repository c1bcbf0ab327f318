"""fronts/multipart.py: the hand-written fast path (`canonical`) reads exactly what python-multipart
(`parsed`) reads, or declines and leaves the body to it. Bodies from a real client (httpx), from wrk's
bodies (loadtest/wrk.py), and hand-made odd and broken ones."""

from __future__ import annotations

import httpx
import pytest

from loadtest import wrk
from service.fronts import multipart
from service.fronts.asgi import ServiceError

B = b"XyZ123boundary"


def httpx_body(files, data=None) -> tuple[bytes, bytes]:
    request = httpx.Request("POST", "http://127.0.0.1/", files=files, data=data)
    return request.headers["content-type"].encode(), request.read()


def boundary_of(content_type: bytes) -> bytes:
    return content_type.split(b"boundary=")[1]


CLIENT_BODIES = {
    "one image": httpx_body({"image": ("d.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)))}),
    "image and fields": httpx_body({"image": ("d.png", b"abc")}, {"model": "lenet5", "top_k": "3"}),
    "two images": httpx_body([("image", ("a.png", b"a" * 1000)), ("image", ("b.png", b"\r\n--" * 50))]),
    "empty file": httpx_body({"image": ("e.png", b"")}),
    "unicode filename": httpx_body({"image": ("zahl-β.png", b"x")}),
    "wrk": (b"multipart/form-data; boundary=" + B, wrk.multipart(b"\x89PNG....", {"top_k": "2"}, B.decode())),
}


@pytest.mark.parametrize("name", CLIENT_BODIES)
def test_client_bodies_take_the_fast_path_and_read_the_same(name):
    content_type, body = CLIENT_BODIES[name]
    fast = multipart.canonical(boundary_of(content_type), body, multipart.MAX_PARTS)
    assert fast is not None, "a body as clients write it should not need the slow parser"
    assert fast == multipart.parsed(boundary_of(content_type), body, multipart.MAX_PARTS)
    assert fast == multipart.parts(content_type, body)


def part(headers: bytes, content: bytes) -> bytes:
    return b"--" + B + b"\r\n" + headers + b"\r\n\r\n" + content + b"\r\n"


GOOD = part(b'Content-Disposition: form-data; name="image"; filename="a.png"', b"DATA")
ODD_BODIES = {
    "preamble": b"hello\r\n" + GOOD + b"--" + B + b"--\r\n",
    "epilogue": GOOD + b"--" + B + b"--\r\nbye",
    "no closing CRLF": GOOD + b"--" + B + b"--",
    "no closing delimiter": GOOD,
    "LF line endings": GOOD.replace(b"\r\n", b"\n") + b"--" + B + b"--\n",
    "padding after a delimiter": GOOD.replace(B + b"\r\n", B + b"  \r\n") + b"--" + B + b"--\r\n",
    "part content type": part(b'Content-Disposition: form-data; name="image"; filename="a.png"\r\n'
                              b"Content-Type: image/png", b"X") + b"--" + B + b"--\r\n",
    "lower-case header": part(b'content-disposition: form-data; name="top_k"', b"2") + b"--" + B + b"--\r\n",
    "no space after colon": part(b'Content-Disposition:form-data; name="top_k"', b"2")
    + b"--" + B + b"--\r\n",
    "no name": part(b"Content-Disposition: form-data", b"2") + b"--" + B + b"--\r\n",
    "no disposition": part(b"Content-Type: text/plain", b"2") + b"--" + B + b"--\r\n",
    "two dispositions": part(b'Content-Disposition: form-data; name="a"\r\nContent-Disposition: form-data; '
                             b'name="b"', b"2") + b"--" + B + b"--\r\n",
    "attachment": part(b'Content-Disposition: attachment; name="top_k"', b"2") + b"--" + B + b"--\r\n",
    "header without colon": part(b"Content-Disposition form-data", b"2") + b"--" + B + b"--\r\n",
    "folded header": part(b'Content-Disposition: form-data;\r\n name="top_k"', b"2") + b"--" + B + b"--\r\n",
    "delimiter-like content": part(b'Content-Disposition: form-data; name="image"; filename="a"',
                                   b"A\r\n--" + B + b"X tail") + b"--" + B + b"--\r\n",
    "empty body": b"",
    "only the closing delimiter": b"--" + B + b"--\r\n",
    "too many parts": GOOD * (multipart.MAX_PARTS + 1) + b"--" + B + b"--\r\n",
}


def outcome(read, body: bytes):
    try:
        return read(B, body, multipart.MAX_PARTS)
    except ServiceError as e:
        return ("refused", e.status)


@pytest.mark.parametrize("name", ODD_BODIES)
def test_odd_bodies_are_read_the_same_or_left_to_the_library(name):
    body = ODD_BODIES[name]
    fast = outcome(multipart.canonical, body)
    slow = outcome(multipart.parsed, body)
    assert fast is None or fast == slow, (fast, slow)
    assert outcome(lambda *a: multipart.parts(b"multipart/form-data; boundary=" + B, body), body) == slow
