"""Flax linen modules: the UNet, the VAE and the CLIP encoders (NHWC)."""
from ip2p_jax.models.clip import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel,
                                  CLIPVisionConfig, CLIPVisionModel)
from ip2p_jax.models.configuration import ConfigError
from ip2p_jax.models.unet import UNet2DConditionModel, UNetConfig
from ip2p_jax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

__all__ = [
    "AutoencoderKL", "CLIPConfig", "CLIPModel", "CLIPTextConfig", "CLIPTextModel",
    "CLIPVisionConfig", "CLIPVisionModel", "ConfigError", "DiagonalGaussian",
    "UNet2DConditionModel", "UNetConfig", "VAEConfig",
]
