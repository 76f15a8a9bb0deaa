"""ip2p_jax: InstructPix2Pix (Brooks, Holynski & Efros, 2023) in JAX/Flax."""
from ip2p_jax import _lazy

__version__ = "0.1.0"
__all__ = ["InstructPix2PixPipeline", "PipelineOutput", "TextToImagePipeline"]
__getattr__, __dir__ = _lazy.exports(__name__, {name: "pipelines" for name in __all__})
