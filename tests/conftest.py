"""Shared fixtures. Server fixtures live in their own modules and are re-exported here."""

from s3fixtures import *  # noqa: F401,F403
