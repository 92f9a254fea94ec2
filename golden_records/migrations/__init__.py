"""Alembic migrations of the central store: the tool creates and upgrades its own schema."""
