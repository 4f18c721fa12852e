"""Fixtures that start real loopback swarms (marked ``swarm``: slower, multi-process)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.harness import LocalSwarm
from tests.helpers import MODEL_CACHE


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.swarm)


@pytest.fixture(scope="module")
def local_swarm(tmp_path_factory, request) -> Iterator[LocalSwarm]:
    swarm = LocalSwarm(tmp_path_factory.mktemp("swarm"), MODEL_CACHE)
    failures_before = request.session.testsfailed
    swarm.start_bootstrap()
    yield swarm
    if request.session.testsfailed > failures_before:
        print(swarm.dump_logs())
    swarm.stop()
