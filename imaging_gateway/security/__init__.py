"""Security: principals and tokens, consent decisions, the patient-data gate, the audit chain."""
