"""The study index: schema, migrations and queries over SQLite or PostgreSQL (one code path)."""
