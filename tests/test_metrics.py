"""/metrics of a real server: the latency histogram says which processor styled the frames, and each processor's
state is there as /healthz says it at that moment."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.browser import FramePusher
from tests.helpers import gradient_jpeg, running_server

pytestmark = pytest.mark.integration


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of `name` in Prometheus text: sorted label pairs -> value."""
    found = {}
    for labels, value in re.findall(rf"^{name}{{([^}}]*)}} (\S+)$", text, re.MULTILINE):
        found[tuple(sorted(re.findall(r'(\w+)="([^"]*)"', labels)))] = float(value)
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # identity beside filter: two processors that both run here, so one server shows both labels
    env = {"DREAMSTREAM_PROCESSORS": "filter,identity"}
    with running_server(tmp_path_factory.mktemp("metrics-server"), processor="filter", env=env) as srv:
        yield srv


def test_latency_is_labelled_with_the_processor_that_styled_the_frame(server):
    frame = gradient_jpeg()
    with FramePusher(server.ws, "painted", frame, fps=15), FramePusher(server.ws, "plain", frame, fps=15):
        time.sleep(1.0)
        reply = httpx.post(f"{server.http}/api/streams/plain/config", json={"processor_type": "identity"}, timeout=10)
        assert reply.status_code == 200, reply.text
        time.sleep(2.0)
        text = httpx.get(f"{server.http}/metrics", timeout=10).text
    counts = samples(text, "dreamstream_processing_latency_seconds_count")
    assert counts.get((("processor", "filter"),), 0) >= 10, counts
    assert counts.get((("processor", "identity"),), 0) >= 5, counts
    assert set(counts) <= {(("processor", "filter"),), (("processor", "identity"),)}, counts
    buckets = samples(text, "dreamstream_processing_latency_seconds_bucket")
    assert buckets[(("le", "+Inf"), ("processor", "filter"))] == counts[(("processor", "filter"),)]


def test_processor_state_matches_healthz_when_metrics_is_read(server):
    health = httpx.get(f"{server.http}/healthz", timeout=10).json()["processors"]
    states = samples(httpx.get(f"{server.http}/metrics", timeout=10).text, "dreamstream_processor_state")
    assert set(health) >= {"filter", "identity", "standard", "lightning"}, health
    for name, info in health.items():
        mine = {dict(k)["state"]: v for k, v in states.items() if dict(k)["processor"] == name}
        assert mine[info["state"]] == 1.0, (name, info, mine)
        assert sum(mine.values()) == 1.0, (name, mine)  # its other states read 0
        assert {"ready", "loading", "unavailable"} <= set(mine), mine
    assert health["filter"]["state"] == "ready"
    # not in DREAMSTREAM_PROCESSORS (and no CUDA GPU here): unavailable
    assert health["lightning"]["state"] == "unavailable"
    assert set(dict(k)["processor"] for k in states) == set(health)
