"""Session fixtures the integration modules share (pytest makes one instance per session only from a conftest)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.slurm_support import Cluster, start_cluster


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One Slurm test cluster for the session (test_slurm.py, test_docs_commands.py), stopped at its end."""
    with start_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
