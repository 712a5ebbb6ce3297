"""Data preparation stages on datatrove: ingest, cleaning, quality filters, language ID, PII, dedup."""
