"""What a worker's logs must never contain: credentials, presigned-URL signatures, input images.

`scan` is run on every worker log the suite wrote (conftest.py's pytest_sessionfinish: the
log files of the handler processes it started, and a file of every `diffbox` log record of
this process) and by test_log_hygiene.py on a worker it drives through the risky paths.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from tests.conftest import TEST_INPUT
from tests.lorafiles import CIVITAI_TOKEN, HF_TOKEN
from tests.s3 import ACCESS_KEY, SECRET_KEY

FORBIDDEN = [
    SECRET_KEY, ACCESS_KEY, HF_TOKEN, CIVITAI_TOKEN,
    "Signature=",  # X-Amz-Signature= (SigV4) and Signature= (SigV2) query parameters
    "X-Amz-Credential=", "X-Amz-Security-Token=", "AWSAccessKeyId=",
    TEST_INPUT["input"]["images"][0]["image"][:48],
]
# Image bytes in any encoding would be a long unbroken run of base64 characters.
BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{200,}")


def scan(paths: Iterable[Path], extra: Iterable[str] = ()) -> list[str]:
    """One line per finding: the file, the line number and what was found (never the secret)."""
    findings = []
    needles = [*FORBIDDEN, *extra]
    for path in paths:
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            for index, needle in enumerate(needles):
                if needle in line:
                    findings.append(f"{path}:{number}: forbidden string #{index} ({needle[:6]}...)")
            if (match := BASE64_RUN.search(line)) is not None:
                findings.append(f"{path}:{number}: {len(match.group())} characters of base64")
    return findings
