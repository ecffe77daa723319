"""Image encoders: one registry maps a name to a frozen model, its preprocessing and the facts the store records.

``common`` holds what every family shares, ``efficientnet``, ``openclip`` and ``timm_models`` one family each, and
``registry`` parses names and dispatches to them.
"""

from indexer.encoders.common import Encoder, EncoderError, resolve_device
from indexer.encoders.registry import (
    KNOWN_ENCODERS,
    describe_known_encoders,
    has_text_tower,
    load_encoder,
    parse_encoder_name,
)

__all__ = [
    "KNOWN_ENCODERS",
    "Encoder",
    "EncoderError",
    "describe_known_encoders",
    "has_text_tower",
    "load_encoder",
    "parse_encoder_name",
    "resolve_device",
]
