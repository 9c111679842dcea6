"""callboard: fast, sturdy LiveKit voice-agent workers and an embedded LiveKit-compatible server."""

from callboard.version import __version__

__all__ = ["__version__"]
