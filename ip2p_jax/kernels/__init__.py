"""Hand-written kernels where XLA's own code is slow: FlashAttention for the CPU in C++
through XLA's FFI (:mod:`ip2p_jax.kernels.cpu_attention`), chosen by
``models.layers.dot_product_attention``."""
