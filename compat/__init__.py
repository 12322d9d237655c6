"""vLLM version detection and the shims between releases. Knows nothing of FlashHead math."""
