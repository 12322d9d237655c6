"""Patchset YAML: the model, validation, loading, selection by vLLM version, range checks.

One file per vLLM version range (``patchsets/vllm-X.Y.yaml``, schema in docs/DESIGN.md).
Validation collects every problem in a file and reports each as
``file:line: field: problem (fix)``; line numbers come from the YAML node marks (the file is
composed with ``yaml.SafeLoader``, so the values mean exactly what ``yaml.safe_load`` gives).
``flashhead.registry`` is this package's public face.
"""
