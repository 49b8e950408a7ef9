"""Reproducibility machinery: provenance, run manifests, regression tracking, per-rule code hashes."""
