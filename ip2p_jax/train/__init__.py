"""Training: train state and EMA, objectives (VAE, CLIP, text-to-image, InstructPix2Pix),
the jitted sharded step, and the loop with orbax checkpoints and exact resume."""
