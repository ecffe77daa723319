"""Image encoders: one registry maps a name to a frozen model, its preprocessing and the facts the store records."""

from indexer.encoders.base import Encoder, EncoderError
from indexer.encoders.registry import KNOWN_ENCODERS, describe_known_encoders, load_encoder, parse_encoder_name

__all__ = [
    "KNOWN_ENCODERS",
    "Encoder",
    "EncoderError",
    "describe_known_encoders",
    "load_encoder",
    "parse_encoder_name",
]
