"""ip2p_jax: InstructPix2Pix (Brooks, Holynski & Efros, 2023) in JAX/Flax."""
__version__ = "0.1.0"
