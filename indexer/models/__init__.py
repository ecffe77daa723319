"""Trained models over the photos and their embeddings: a convolutional VAE (vae) and embedding mappers (mapper).

Shared by both: their files (checkpoint), scoped torch settings (scoped), latent paths (interpolate) and config
help and checks (config_docs).
"""
