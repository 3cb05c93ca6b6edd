"""The final output's timing of a request that migrated: its KV transfer is the last
attempt's, and the wait between attempts is its ``migration`` (a probe saw 37.7 s of
migration reported as kv_transfer, where the transfers took 1 to 2 ms)."""

from __future__ import annotations

import pytest

from cluster.backend import BackendOutput, BackendRequest
from cluster.cluster_backend import ClusterBackend
from cluster.config import SchedulerConfig
from cluster.flight import Attempt, AttemptIds, Flight
from cluster.global_scheduler import GlobalScheduler
from engine import SamplingParams


def _flight() -> Flight:
    req = BackendRequest("r", [1, 2, 3], SamplingParams(max_tokens=8), arrival_time=100.0)
    flight = Flight(req, Attempt("r#0.x0"))
    # the first attempt: placed, prefilled, first token at 100.5; its decode worker died
    flight.timing.update({"placed": 100.1, "prefill_arrival": 100.1, "prefill_start": 100.2,
                          "first_token": 100.5})
    flight.attempt.times.update({"prefill_arrival": 100.1, "prefill_start": 100.2,
                                 "first_token": 100.5})
    flight.migrations["decode"] = 1
    flight.migration_s = 30.0  # waiting for a replacement
    attempt = flight.next_attempt(AttemptIds())
    attempt.times.update({"prefill_arrival": 131.0, "prefill_start": 131.1,
                          "first_token": 131.4})
    return flight


def test_a_migrated_request_reports_the_last_attempts_transfer_and_its_migration():
    backend = ClusterBackend(GlobalScheduler(SchedulerConfig()))
    flight = _flight()
    decode_times = {"kv_landed": 131.402, "activated": 131.403, "finished": 132.0}
    out = backend._final(flight, BackendOutput("r", [7], "length"), decode_times)
    assert out.timing["kv_transfer"] == pytest.approx(0.002)
    assert out.timing["decode_queue"] == pytest.approx(0.001)
    assert out.timing["prefill_compute"] == pytest.approx(0.3)  # the first token's prefill
    assert out.timing["migrations"] == 1.0 and out.timing["migration"] == 30.0
