"""fronts/stack.py: our middlewares run ahead of BentoML's, and BentoML's TimeoutMiddleware (whose
never-cancelled per-request timers were the p99: BENCHMARKS.md, "Where the tail was") is gone. Read
from the middleware list BentoML's own app factory builds for the real service, in a fresh process
with the test store (importing the service checks the store)."""

from __future__ import annotations

import json
import os
import subprocess

from conftest import PYTHON, ROOT

PROBE = """
import json
from service.service import ConvServe
ConvServe.inject_config()  # what `bentoml serve` does before building the app
from _bentoml_impl.server.app import ServiceAppFactory
print(json.dumps([m.cls.__name__ for m in ServiceAppFactory(ConvServe, is_main=True).middlewares]))
"""


def test_our_middlewares_first_and_no_bentoml_timeout(store):
    env = {**os.environ, "BENTOML_HOME": str(store), "CONVSERVE_MODELS": "lenet5"}
    done = subprocess.run([PYTHON, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    names = json.loads(done.stdout.strip().splitlines()[-1])
    assert names[:5] == ["Gate", "V2Route", "OpenAPIRoute", "ClassifyRoute", "ScoreMapRoute"], names
    assert "TimeoutMiddleware" not in names and "MaxConcurrencyMiddleware" not in names, names
    # BentoML's metrics and tracing still see what reaches BentoML, then the real path comes back
    assert names.index("RunnerTrafficMetricsMiddleware") < names.index("Restore"), names
    assert names[-1] == "Restore", names
