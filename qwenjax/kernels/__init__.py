"""Attention and int8 matmul kernels, each beside the plain-JAX reference it is tested against, and the
power-of-two buckets that every padded size comes from."""
