"""Weights I/O: diffusers/transformers folders <-> our parameter pytrees (safetensors only)."""
from ip2p_jax.checkpoints.io import (CheckpointError, PipelineInfo, PipelineParts,
                                     UnsafeWeightsError, abstract_params, check_component,
                                     check_pipeline, load_component, load_pipeline,
                                     module_from_config, resolve, save_component, save_pipeline)
from ip2p_jax.checkpoints.safetensors import SafetensorsError

__all__ = [
    "CheckpointError", "PipelineInfo", "PipelineParts", "SafetensorsError", "UnsafeWeightsError",
    "abstract_params", "check_component", "check_pipeline", "load_component", "load_pipeline", "module_from_config", "resolve", "save_component",
    "save_pipeline",
]
