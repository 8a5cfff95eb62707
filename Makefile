# The two commands of README.md: `make run` (the main job) and `make test` (the whole suite).
# Each installs what it needs first, so both work on a fresh machine.

UV_VERSION := 0.13.8
export DIFFBOX_TEST_CACHE ?= $(HOME)/.cache/diffbox-test

.PHONY: setup run test lint docs vllm-env comfyui-env image-test

setup:
	@command -v uv >/dev/null 2>&1 && uv --version | grep -q "$(UV_VERSION)" || python3 -m pip install -q "uv==$(UV_VERSION)"
	uv sync --frozen --extra modal

# A real ComfyUI on the CPU running test_input.json (a model-free graph) on a worker in this
# process (`--endpoint local`): live progress, outputs saved into $(RUN_OUT), a summary.
# The ComfyUI is the one `make comfyui-env` installs (the tests' real leg: from GitHub, or from
# DIFFBOX_COMFYUI_SOURCE); DIFFBOX_COMFYUI_URL (a running ComfyUI) or DIFFBOX_COMFYUI_DIR (an
# existing install, with DIFFBOX_COMFYUI_PYTHON) skip that install.
RUN_OUT ?= out
COMFYUI_ENV := $(DIFFBOX_TEST_CACHE)/comfyui
run: setup
	@if [ -z "$$DIFFBOX_COMFYUI_URL" ] && [ -z "$$DIFFBOX_COMFYUI_DIR" ]; then \
		bash tests/comfyui_env/setup.sh "$(DIFFBOX_TEST_CACHE)" >/dev/null; fi
	DIFFBOX_COMFYUI_DIR=$${DIFFBOX_COMFYUI_DIR:-$(COMFYUI_ENV)/ComfyUI} \
	DIFFBOX_COMFYUI_PYTHON=$${DIFFBOX_COMFYUI_PYTHON:-$$( [ -x $(COMFYUI_ENV)/venv/bin/python ] && echo $(COMFYUI_ENV)/venv/bin/python || echo python3)} \
	DIFFBOX_COMFYUI_ARGS=$${DIFFBOX_COMFYUI_ARGS:---cpu} \
	uv run --frozen python -m diffbox run --endpoint local --input test_input.json --out $(RUN_OUT) --poll 0.2

vllm-env:
	bash tests/vllm_env/setup.sh "$(DIFFBOX_TEST_CACHE)"

# The real ComfyUI of the tests' real leg: from GitHub, or from DIFFBOX_COMFYUI_SOURCE (local archives).
comfyui-env: setup
	bash tests/comfyui_env/setup.sh "$(DIFFBOX_TEST_CACHE)"

# The docs written from the code (configuration tables, API fields, .runpod/ Hub files).
docs: setup
	uv run python -m diffbox.docgen

lint: setup
	uv run ruff check .
	uv run mypy
	uv run mypy builder

# Everything against the fake ComfyUI, then the tests that talk to ComfyUI against a real one.
test: setup vllm-env comfyui-env lint
	uv run pytest --comfyui=fake
	uv run pytest --comfyui=real

# Dockerfile.serverless built here (the tiny models of comfyui-env, local stand-ins for what this
# machine cannot pull) and run as RunPod runs it, on the CPU: docs/image-test.md.
image-test: setup comfyui-env
	bash tests/image/run.sh
