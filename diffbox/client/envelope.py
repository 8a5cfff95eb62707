"""What a status request answers: RunPod's job envelope, `{"id", "status", "output" | "error"}`.

Every transport returns one and `Job` reads them; this module is what both import.
"""

from __future__ import annotations

from typing import Any

Envelope = dict[str, Any]
FINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
