"""Attention (and, later, matmul) kernels, each beside the plain-JAX reference it is tested against."""
