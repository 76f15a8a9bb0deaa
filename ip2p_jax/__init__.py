"""ip2p_jax: InstructPix2Pix (Brooks, Holynski & Efros, 2023) in JAX/Flax."""
__version__ = "0.1.0"

from ip2p_jax.pipelines import InstructPix2PixPipeline, PipelineOutput, TextToImagePipeline

__all__ = ["InstructPix2PixPipeline", "PipelineOutput", "TextToImagePipeline"]
