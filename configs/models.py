"""Model shapes, written exactly as the ``config.json`` of a diffusers/transformers folder.

Full size: Stable Diffusion 1.5 (UNet with 4 input channels for text-to-image and
8 for InstructPix2Pix, the VAE) and OpenAI CLIP ViT-L/14 (text and vision).
Tiny: the same architectures at widths that compile in seconds on a CPU (tests,
and the default model trained on the shapes world).

    from configs import models
    from ip2p_jax.models import UNetConfig
    cfg = UNetConfig.from_dict(models.SD15_UNET)
"""

SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}

# InstructPix2Pix: the same UNet reading [noisy latent, image latent] (timbrooks/instruct-pix2pix).
IP2P_UNET = {**SD15_UNET, "in_channels": 8}

# Stable Diffusion 2.x (stabilityai/stable-diffusion-2-1): linear proj_in/proj_out, head
# dims per block, OpenCLIP-H context (1024), 96x96 latents.
SD2_UNET = {**SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
            "use_linear_projection": True, "sample_size": 96}

SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# SD 1.5's text_encoder/config.json (eos_token_id=2 predates transformers PR #24773).
CLIP_L14_TEXT = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

CLIP_L14_VISION = {
    "architectures": ["CLIPVisionModelWithProjection"],
    "model_type": "clip_vision_model",
    "hidden_act": "quick_gelu",
    "hidden_size": 1024,
    "image_size": 224,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
}

TINY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "attention_head_dim": 4,
    "block_out_channels": [32, 64],
    "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "out_channels": 4,
    "sample_size": 8,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
TINY_IP2P_UNET = {**TINY_UNET, "in_channels": 8}

TINY_VAE = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 16,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
}

TINY_CLIP_TEXT = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "max_position_embeddings": 77,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 32,
    "vocab_size": 49408,
    "eos_token_id": 49407,
}

TINY_CLIP_VISION = {
    "architectures": ["CLIPVisionModelWithProjection"],
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "image_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "patch_size": 8,
    "projection_dim": 32,
}

ALL = {
    "sd15_unet": SD15_UNET, "ip2p_unet": IP2P_UNET, "sd2_unet": SD2_UNET, "sd15_vae": SD15_VAE,
    "clip_l14_text": CLIP_L14_TEXT, "clip_l14_vision": CLIP_L14_VISION,
    "tiny_unet": TINY_UNET, "tiny_ip2p_unet": TINY_IP2P_UNET, "tiny_vae": TINY_VAE,
    "tiny_clip_text": TINY_CLIP_TEXT, "tiny_clip_vision": TINY_CLIP_VISION,
}
