"""Flax linen modules: the UNet, the VAE and the CLIP encoders (NHWC)."""
from ip2p_jax import _lazy

__all__ = [
    "AutoencoderKL", "CLIPConfig", "CLIPModel", "CLIPTextConfig", "CLIPTextModel",
    "CLIPVisionConfig", "CLIPVisionModel", "ConfigError", "DiagonalGaussian",
    "UNet2DConditionModel", "UNetConfig", "VAEConfig",
]
_SOURCE = {"AutoencoderKL": "vae", "DiagonalGaussian": "vae", "VAEConfig": "vae",
           "UNet2DConditionModel": "unet", "UNetConfig": "unet",
           "ConfigError": "configuration"}
__getattr__, __dir__ = _lazy.exports(__name__, {name: _SOURCE.get(name, "clip")
                                                for name in __all__})
