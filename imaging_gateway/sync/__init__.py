"""Sync jobs: list a store page by page, read new or changed headers, upsert, checkpoint."""
