"""Integrations of the engine with training programs. Layer 3."""
