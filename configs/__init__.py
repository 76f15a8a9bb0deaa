"""Configs: model shapes (``models``) and, per job, ml_collections ``get_config`` files."""
