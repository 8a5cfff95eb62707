"""RunPod's endpoint API served by diffbox itself (`python -m diffbox serve`, the Modal web
endpoint), over job runners."""
