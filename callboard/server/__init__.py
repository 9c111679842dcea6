"""The embedded LiveKit-compatible server (`callboard server`)."""
