"""Patchsets: one YAML file per vLLM version range, shipped as package data."""
