"""Shared fixtures: real deployments on real SQLite files (and PostgreSQL when CI provides it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deployments import DeploymentUnderTest, make_deployment

POSTGRESQL_URL_ENV = "CFL_SFTP_TEST_POSTGRESQL_URL"


@pytest.fixture
def td(tmp_path: Path) -> Iterator[DeploymentUnderTest]:
    """A fresh deployment with the test policy set, on SQLite."""
    deployment = make_deployment(tmp_path)
    yield deployment
    deployment.deployment.close()
