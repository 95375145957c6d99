"""MAGI-1 (SandAI): chunk-wise autoregressive video diffusion; DiT in `model`, loading in `checkpoint`."""
