"""The FlashHead core: Triton kernels and a PyTorch reference. Knows nothing of vLLM."""
