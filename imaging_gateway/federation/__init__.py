"""Federation: peer registry, signed cross-province assertions, fan-out search (IHE XCA-I roles)."""
