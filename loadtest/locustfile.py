"""Locust users for convserve. Run headless through `python -m loadtest.run` (or `make loadtest`),
which bounds the run and refuses any host but loopback.

- ClassifyUser: one real held-out digit (PNG) per POST /classify; a malformed answer is a failure
  (accuracy itself is tested in tests/test_service.py, not here: a misread digit is not a failure).
- ScoreMapUser: one 512×512 synthesized page per POST /score_map.
- PhotoUser: one 224×224 JPEG crop of a real photo per POST /classify to $LOADTEST_MODEL (default
  alexnet): the compute-bound benchmark.
- The `mixed` scenario runs ClassifyUser and ScoreMapUser, 9 : 1.
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


class ClassifyUser(FastHttpUser):
    wait_time = constant(0)
    weight = 9

    def on_start(self) -> None:
        self.cycle = itertools.cycle(DIGITS)

    @task
    def classify(self) -> None:
        body, _ = next(self.cycle)
        with self.client.post("/classify", files={"image": ("digit.png", body, "image/png")},
                              catch_response=True, name="/classify") as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            elif response.json()["predictions"][0]["top_k"][0]["label"] not in DIGIT_LABELS:
                response.failure(f"unexpected answer: {response.text[:200]}")


class ScoreMapUser(FastHttpUser):
    wait_time = constant(0)
    weight = 1

    def on_start(self) -> None:
        self.cycle = itertools.cycle(PAGES)

    @task
    def score_map(self) -> None:
        with self.client.post("/score_map", files={"image": ("page.png", next(self.cycle), "image/png")},
                              catch_response=True, name="/score_map") as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")


class PhotoUser(FastHttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        self.cycle = itertools.cycle(PHOTOS)

    @task
    def classify_photo(self) -> None:
        with self.client.post("/classify", files={"image": ("photo.jpg", next(self.cycle), "image/jpeg")},
                              data={"model": PHOTO_MODEL}, catch_response=True, name="/classify") as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
