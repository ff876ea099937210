"""The soak of `benchmarks/soak.py`, reduced to run with the tests: 40 requests from 8 clients
(4 of them streams left mid-way) against `python -m edgespec serve` on the tiny pair, in a few
seconds.

Its criteria are the benchmark's, unchanged: no failed request (no 5xx, nor anything else), every
answer identical to its request served alone, a clean exit on Ctrl-C with no error on standard
error, and resident memory growing less than 10% from after the warm-up to the end. The warm-up
(every distinct request alone, then two requests per client at once) has already grown the
server's pools and arenas, so on the tiny pair the growth over these 40 requests measures about
+0.1%: the bound needs no loosening for noise. It is coarse on so few requests, though: from an
83 MiB server it catches a leak of some 200 KiB per request; the full run (200 requests,
benchmarks/results/soak.json) catches a fifth of that.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from ..conftest import tiny_model_args

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


@pytest.fixture(scope="module")
def soak_module():
    spec = importlib.util.spec_from_file_location("soak_benchmark", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_the_plan_mixes_what_the_soak_claims(soak_module):
    specs = soak_module.make_specs(24)
    plan = soak_module.make_plan(200, len(specs), abandon_every=10)
    assert len(set(specs)) == 24 and len(plan) == 200
    assert sum(p.abandon for p in plan) == 20 and all(p.stream for p in plan if p.abandon)
    chosen = [specs[p.spec] for p in plan]
    assert {s.chat for s in chosen} == {True, False} and {p.stream for p in plan} == {True, False}
    assert {s.temperature for s in chosen} == {0.0, 0.8} and any(s.stop for s in chosen)
    assert len({s.prompt for s in chosen}) == len(soak_module.PROMPTS)
    assert plan == soak_module.make_plan(200, len(specs), abandon_every=10)  # the same every run


@pytest.mark.parametrize("parallel", [1, 4])
def test_soak_40_requests_from_8_clients(soak_module, tiny_pair, tmp_path, parallel):
    """One request at a time, and 4 at once in shared passes (issue 20): under the exact kernels
    the tiny pair runs on, every answer is still the one its request gets alone."""
    env = {**os.environ, "EDGESPEC_CACHE_DIR": str(tmp_path)}
    flags = [*tiny_model_args(tiny_pair, ctx=1024), "--parallel", str(parallel)]
    outcome = soak_module.soak(flags, requests=40, clients=8, env=env)
    summary = outcome["summary"]
    assert summary["failures"] == [], "\n".join(soak_module.table(summary))
    assert summary["errors_by_status"] == {} and summary["abandoned"] == 4
    assert summary["identical_to_alone"] == summary["answered"] == 36
    assert summary["server_exit_code"] == 130 and "Traceback" not in outcome["stderr"]
    health = summary["server_health"]
    assert health["failed"] == 0 and health["rejected"] == 0 and not health["busy"]
