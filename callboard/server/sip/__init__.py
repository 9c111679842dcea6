"""The SIP gateway: LiveKit's `livekit.SIP` API (trunks, dispatch rules, calls) and the user
agent that lets phones call into rooms."""
