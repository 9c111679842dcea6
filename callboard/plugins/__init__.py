"""livekit-agents plugins that ship with callboard."""
