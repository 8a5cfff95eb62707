"""Build-time tooling: model weights and the pinned ComfyUI install (`python -m builder`)."""


class BuildError(Exception):
    """Something the builder was asked to do that can't be done as asked (an unknown
    workflow, clashing files, a failed command); its message says what to change."""
