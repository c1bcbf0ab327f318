"""loadtest.wrk against a real FastAPI baseline server on the real store (conftest.store): wrk's
multipart bodies are answered 200, and the Lua hook counts answers that are not 2xx exactly."""

from __future__ import annotations

import shutil

import pytest

from loadtest import samples, wrk
from loadtest.servers import BaselineServer

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None,
                                reason="wrk is not installed (apt-get install wrk; .ci/run does)")
NO_SOCKET_ERRORS = {"connect": 0, "read": 0, "write": 0, "timeout": 0}


@pytest.fixture(scope="module")
def baseline(store, tmp_path_factory):
    with BaselineServer(store, tmp_path_factory.mktemp("log") / "baseline.log") as srv:
        yield srv


def test_wrk_posts_digits_and_every_answer_is_200(baseline, tmp_path):
    bodies = [png for png, _ in samples.digits(50)]
    r = wrk.run(baseline.url, "/classify", bodies, seconds=3, connections=8, out=tmp_path)
    assert r["requests"] > 0, r
    assert r["non_2xx"] == 0, (tmp_path / "wrk.log").read_text()
    assert r["socket_errors"] == NO_SOCKET_ERRORS, r
    assert len(list(tmp_path.glob("body-*.bin"))) == 50


def test_wrk_counts_answers_that_are_not_2xx(baseline):
    good = [png for png, _ in samples.digits(3)]
    r = wrk.run(baseline.url, "/classify", [*good, b"not an image"], seconds=2, connections=4)
    assert 0 < r["non_2xx"] < r["requests"], r  # one body in four is refused (422), the rest are not
    assert r["socket_errors"] == NO_SOCKET_ERRORS, r
    only_bad = wrk.run(baseline.url, "/classify", [b"not an image"], seconds=1, connections=2)
    assert only_bad["non_2xx"] == only_bad["requests"] > 0, only_bad


def test_wrk_refuses_other_hosts():
    with pytest.raises(SystemExit, match="not a loopback address"):
        wrk.run("http://192.0.2.1:3000", "/classify", [b"x"], seconds=1, connections=1)


def test_wrk_speaks_the_open_inference_protocol(server, tmp_path):
    """--protocol v2: tritonclient-shaped bodies (one padded JSON header length for all) are answered
    200 by the real server's /v2; a body that is not an image is counted as not 2xx."""
    good = [png for png, _ in samples.digits(20)]
    r = wrk.run(server.url, "/v2/models/lenet5/infer", good, seconds=2, connections=4, out=tmp_path,
                protocol="v2")
    assert r["requests"] > 0 and r["non_2xx"] == 0, (tmp_path / "wrk.log").read_text()
    bad = wrk.run(server.url, "/v2/models/lenet5/infer", [good[0], b"not an image"], seconds=1,
                  connections=2, protocol="v2")
    assert 0 < bad["non_2xx"] < bad["requests"], bad
