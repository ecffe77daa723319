"""Trained models over the photos and their embeddings: a convolutional VAE (vae) and embedding mappers (mapper)."""
