"""Float PyTorch reference of M3ViT (multi-task MoE ViT): configs, network, checkpoints, profile."""
from .config import ModelConfig, PRESETS, get_preset

__all__ = ["ModelConfig", "PRESETS", "get_preset"]
