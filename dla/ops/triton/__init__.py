"""Triton kernels (GPU; run on CPU through TRITON_INTERPRET=1 for tests)."""
