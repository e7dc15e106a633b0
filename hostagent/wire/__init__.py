"""The agent-channel wire codec (sans-IO).

Bytes in, frozen dataclasses out.  This package is the only one in the
project that imports construct.  Public API:

- :func:`decode` / :func:`encode` / :func:`signed_region` for whole frames,
- :class:`FrameDecoder` for a byte stream,
- :class:`FrameError` (with :class:`FrameErrorKind`) for every rejection,
- the message dataclasses and enums re-exported from :mod:`.messages`.

The format is specified in docs/wire-format.md, generated from ``schema.py``.
"""

from .codec import Frame, decode, decode_header, encode, signed_region
from .errors import FrameError, FrameErrorKind
from .messages import *  # noqa: F403 - the message types are part of the public API
from .messages import Direction, Header, Message, MessageType
from .stream import FrameDecoder

__all__ = [
    "Direction",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameErrorKind",
    "Header",
    "Message",
    "MessageType",
    "decode",
    "decode_header",
    "encode",
    "signed_region",
]
