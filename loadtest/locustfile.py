"""Locust users for convserve. Run headless through `python -m loadtest.run` (or `make loadtest`),
which bounds the run and refuses any host but loopback.

- ClassifyUser: one real held-out digit (PNG) per POST /classify; a malformed answer is a failure
  (accuracy itself is tested in tests/test_service.py, not here: a misread digit is not a failure).
- ScoreMapUser: one 512×512 synthesized page per POST /score_map.
- PhotoUser: one 224×224 JPEG crop of a real photo per POST /classify to $LOADTEST_MODEL (default
  alexnet): the compute-bound benchmark.
- The `mixed` scenario runs ClassifyUser and ScoreMapUser, 9 : 1.

$LOADTEST_API_KEY, when set, is sent as `Authorization: Bearer …` (servers with CONVSERVE_API_KEYS).
"""

from __future__ import annotations

import itertools
import os

from locust import FastHttpUser, constant, task

from loadtest import samples

DIGITS = samples.digits()
DIGIT_LABELS = {str(d) for d in range(10)}
SCENARIO = os.environ.get("LOADTEST_SCENARIO", "mixed")
PAGES = samples.pages() if SCENARIO in ("mixed", "score_map") else []
PHOTOS = samples.photos() if SCENARIO == "photo" else []
PHOTO_MODEL = os.environ.get("LOADTEST_MODEL", "alexnet")
HEADERS = {"Authorization": f"Bearer {os.environ['LOADTEST_API_KEY']}"} \
    if os.environ.get("LOADTEST_API_KEY") else {}


class ImageUser(FastHttpUser):
    """Posts the next of `images` (cycled) as the multipart field `image` to `route`, back to back;
    any status but 200, or an answer `check` refuses, is a failure."""

    abstract = True
    wait_time = constant(0)
    route, filename, media_type = "/classify", "image.png", "image/png"
    images: list[bytes] = []
    form: dict[str, str] = {}

    def on_start(self) -> None:
        self.cycle = itertools.cycle(self.images)

    def check(self, response) -> str:
        """A failure message for a 200 answer, or "" when it is fine."""
        return ""

    @task
    def post(self) -> None:
        files = {"image": (self.filename, next(self.cycle), self.media_type)}
        with self.client.post(self.route, files=files, data=self.form or None, headers=HEADERS,
                              catch_response=True, name=self.route) as response:
            problem = f"HTTP {response.status_code}" if response.status_code != 200 else \
                self.check(response)
            if problem:
                response.failure(f"{problem}: {response.text[:200]}")


class ClassifyUser(ImageUser):
    weight = 9
    filename, images = "digit.png", [body for body, _ in DIGITS]

    def check(self, response) -> str:
        label = response.json()["predictions"][0]["top_k"][0]["label"]
        return "" if label in DIGIT_LABELS else "unexpected answer"


class ScoreMapUser(ImageUser):
    weight = 1
    route, filename, images = "/score_map", "page.png", PAGES


class PhotoUser(ImageUser):
    filename, media_type, images, form = "photo.jpg", "image/jpeg", PHOTOS, {"model": PHOTO_MODEL}
