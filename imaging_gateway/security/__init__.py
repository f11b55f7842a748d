"""Security: principals and tokens (later: consent, the patient-data gate, crypto, audit)."""
