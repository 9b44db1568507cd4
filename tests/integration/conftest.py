"""Fixtures that start real kmsd clusters (subprocesses, SoftHSM2 tokens, 127.0.0.1)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.harness import Cluster, start_cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One 3-node cluster shared by the tests that do not break nodes. Its nodes serve the API
    from one API worker process each (kmsd.api_workers), so every test on it also checks that
    a worker answers as the primary would; the other clusters serve from their primaries."""
    running = start_cluster(str(tmp_path_factory.mktemp("cluster")),
                            extra_args=("--api-workers", "1"))
    yield running
    running.stop()


@pytest.fixture()
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A fresh 3-node cluster for a test that kills or restarts nodes."""
    running = start_cluster(str(tmp_path_factory.mktemp("own-cluster")))
    yield running
    running.stop()
