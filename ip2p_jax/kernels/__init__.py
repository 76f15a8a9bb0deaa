"""Hand-written kernels where XLA's own code is slow, in C++ for the CPU through XLA's FFI:
FlashAttention (:mod:`ip2p_jax.kernels.cpu_attention`, chosen by
``models.layers.dot_product_attention``), 3x3 convolutions
(:mod:`ip2p_jax.kernels.cpu_conv`, chosen by ``models.layers.Conv``) and group/layer
normalisation (:mod:`ip2p_jax.kernels.cpu_norm`, chosen by ``models.layers.GroupNorm``
and ``LayerNorm``) and the training step's AdamW + EMA update
(:mod:`ip2p_jax.kernels.cpu_adamw`, chosen by ``train.state.FusedAdamW.of``), built for
the machine by :mod:`ip2p_jax.kernels.build`."""
