"""Shared fixtures. Server fixtures live in their own modules and are re-exported here."""
