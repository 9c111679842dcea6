"""The worker side: what `python agent.py start` runs."""
