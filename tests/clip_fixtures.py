"""A tiny random transformers ``CLIPModel`` folder, for the CLIP-metric and eval tests.

The vocabulary is CLIP's full one (49408) so the packaged tokenizer's ids are valid;
everything else is small enough to run in milliseconds.
"""
import torch
import transformers

from conftest import randomize_

TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=12)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              image_size=30, patch_size=10, projection_dim=12)


def save_tiny_clip(folder, seed: int = 0) -> "transformers.CLIPModel":
  torch.manual_seed(seed)
  config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=12)
  model = randomize_(transformers.CLIPModel(config).eval(), seed)
  model.save_pretrained(folder)
  return model
