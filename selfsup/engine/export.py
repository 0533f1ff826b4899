"""Export a trained encoder: RUN_DIR/encoder.safetensors (torchvision ResNet key names, no fc)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["export_encoder"]


def export_encoder(encoder: torch.nn.Module, path: Path) -> None:
    """Save the encoder's state dict as safetensors, atomically (temp file, then rename)."""
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "producer": "selfsup"})
    tmp.replace(path)
