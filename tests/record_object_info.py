"""Re-record the fake ComfyUI's node schemas from the real one the tests install:

    make comfyui-env && uv run python -m tests.record_object_info

Starts that ComfyUI (with its custom nodes, KJNodes among them) with empty model and input
folders, so model-file and image COMBO lists are empty as the fake expects (it fills them
from its own disk), and writes its `GET /object_info` to tests/fakes/comfyui/object_info.json
verbatim. Schemas the installed release lacks stay in tests/fakes/comfyui/extra_schemas/.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import requests

from tests.conftest import free_port
from tests.fakes.comfyui.validate import OBJECT_INFO_PATH
from tests.realcomfy import installed, start_real_comfyui


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="record-object-info-") as tmp, \
            start_real_comfyui(installed(), Path(tmp), free_port(), models=False) as server:
        info = requests.get(f"{server.url}/object_info", timeout=60).json()
        stats = requests.get(f"{server.url}/system_stats", timeout=10).json()
        failed = [line for line in server.log().splitlines() if "IMPORT FAILED" in line]
    OBJECT_INFO_PATH.write_text(json.dumps(info))
    version = stats["system"]["comfyui_version"]
    print(f"{OBJECT_INFO_PATH}: {len(info)} node classes from ComfyUI {version}")
    for line in failed:
        print(f"  {line.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
