"""Wan2.1 components shared by the Wan-based pipelines (SkyReels-V2): text encoder, VAE."""
