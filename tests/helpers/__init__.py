"""Reusable test helpers: tiny local models, a vLLM server fixture."""
