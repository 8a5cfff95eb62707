# The two commands of README.md: `make run` (the main job) and `make test` (the whole suite).
# Each installs what it needs first, so both work on a fresh machine.

UV_VERSION := 0.13.8
COMFYUI_DEST ?= .comfyui
export DIFFBOX_TEST_CACHE ?= $(HOME)/.cache/diffbox-test

.PHONY: setup run test lint vllm-env comfyui-env

setup:
	@command -v uv >/dev/null 2>&1 && uv --version | grep -q "$(UV_VERSION)" || python3 -m pip install -q "uv==$(UV_VERSION)"
	uv sync --frozen --extra modal

# A real ComfyUI on the CPU running test_input.json (a model-free graph) on a worker in this
# process (`--endpoint local`): live progress, outputs saved into $(RUN_OUT), a summary.
# DIFFBOX_COMFYUI_URL (a running ComfyUI) or DIFFBOX_COMFYUI_DIR (an existing install)
# skip the install of the pinned ComfyUI release into $(COMFYUI_DEST).
RUN_OUT ?= out
run: setup
	@if [ -z "$$DIFFBOX_COMFYUI_URL" ] && [ -z "$$DIFFBOX_COMFYUI_DIR" ]; then \
		uv run python -m builder comfyui --dest $(COMFYUI_DEST) --cpu; fi
	DIFFBOX_COMFYUI_DIR=$${DIFFBOX_COMFYUI_DIR:-$(COMFYUI_DEST)/ComfyUI} \
	DIFFBOX_COMFYUI_PYTHON=$${DIFFBOX_COMFYUI_PYTHON:-$$( [ -x $(COMFYUI_DEST)/venv/bin/python ] && echo $(CURDIR)/$(COMFYUI_DEST)/venv/bin/python || echo python3)} \
	DIFFBOX_COMFYUI_ARGS=$${DIFFBOX_COMFYUI_ARGS:---cpu} \
	uv run --frozen python -m diffbox run --endpoint local --input test_input.json --out $(RUN_OUT) --poll 0.2

vllm-env:
	bash tests/vllm_env/setup.sh "$(DIFFBOX_TEST_CACHE)"

# The real ComfyUI of the tests' real leg: from GitHub, or from DIFFBOX_COMFYUI_SOURCE (local archives).
comfyui-env: setup
	bash tests/comfyui_env/setup.sh "$(DIFFBOX_TEST_CACHE)"

lint: setup
	uv run ruff check .
	uv run mypy
	uv run mypy builder

# Everything against the fake ComfyUI, then the tests that talk to ComfyUI against a real one.
test: setup vllm-env comfyui-env lint
	uv run pytest --comfyui=fake
	uv run pytest --comfyui=real
