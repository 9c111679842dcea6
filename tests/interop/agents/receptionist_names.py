"""Names shared by the receptionist probe (an agent script) and the call that drives it."""

from typing import Final

SIDE_ENV: Final = "RECEPTIONIST_SIDE"
FILE_ENV: Final = "RECEPTIONIST_FILE"
REPORT_ENV: Final = "RECEPTIONIST_REPORT"
AGENT_NAME: Final = "receptionist-probe"
CALLBOARD: Final = "callboard"
LIVEKIT_AGENTS: Final = "livekit-agents"
