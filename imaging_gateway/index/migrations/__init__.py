"""Alembic migrations of the study index, run by ``SqlIndex.open``."""
