"""Crypto primitives: AEAD suites, the envelope format, keyrings, key files, sealed index cells
and blind indexes, TLS contexts. Imports nothing of ours but ``errors`` and ``settings``."""
