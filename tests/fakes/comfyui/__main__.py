"""`python -m tests.fakes.comfyui --listen 127.0.0.1 --port 8188 [--cpu] [--base-directory DIR]`."""

import sys

from .server import main

sys.exit(main())
