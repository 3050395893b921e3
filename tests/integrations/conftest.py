"""transformers and TRL offline: no hub look-ups, no telemetry pings from TRL's trainers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
