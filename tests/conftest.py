"""Shared fixtures. Server fixtures live in their own helper modules and are re-exported here."""

import pytest
from fakeservers import *  # noqa: F403 - the fixtures of the fake SMTP and webhook servers
from s3fixtures import *  # noqa: F403 - the fixtures of the S3 servers

from replicator.metrics import Metrics, create_metrics


@pytest.fixture
def metrics() -> Metrics:
    """A fresh metrics registry."""
    return create_metrics()
