"""`python -m diffbox`: tools around the worker, a client for its endpoints, and a local endpoint.

    python -m diffbox schema [WORKFLOW]     JSON Schema of a job's input (or of one workflow's)
    python -m diffbox graph WORKFLOW JSON   the ComfyUI graph a request becomes, not run
    python -m diffbox run WORKFLOW ...      run a job on an endpoint: live progress, outputs saved
    python -m diffbox chat PROMPT ...       chat with an endpoint's model, the answer streamed
    python -m diffbox serve [--port 8000]   RunPod's endpoint API on this machine, jobs run here

Each subcommand is one entry of `COMMANDS`: its help, its arguments, and what it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .client import cli as client_cli
from .client import exits
from .errors import JobError
from .inputs.media import InputImage, decode_image
from .workflows import CHAT_DROP_IN, NAMED, RAW, parse
from .workflows.base import JobContext


@dataclass(frozen=True)
class Command:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    # Command lines shown under the help, each a `diffbox ...` line (a test parses them), with a comment.
    examples: tuple[str, ...] = ()


def _workflows() -> dict[str, type[BaseModel]]:
    return {**{name: w.request for name, w in NAMED.items()}, "raw": RAW.request,
            "chat_vllm_worker": CHAT_DROP_IN.request}


def _schema_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workflow", nargs="?", choices=sorted(_workflows()), help="only this workflow's request")


def _schema(args: argparse.Namespace) -> int:
    models = _workflows()
    if args.workflow:
        schema = models[args.workflow].model_json_schema()
    else:
        refs, defs = models_json_schema([(m, "validation") for m in models.values()])
        schema = {"title": "diffbox job input",
                  "description": "The `input` of a job: one of the workflows' requests, chosen by `workflow`.",
                  "anyOf": list(refs.values()), **defs}
    print(json.dumps(schema, indent=1, ensure_ascii=False))
    return 0


def _graph_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workflow", help="a workflow name (" + ", ".join(sorted(NAMED)) + ")")
    parser.add_argument("request", help="the request as JSON ('-' reads it from stdin); `workflow` may be left out")


def _stand_in(value: str, field: str) -> InputImage:
    """Decode an image given inline; stand in for one that is not (a URL, a placeholder):
    the graph is the same but for sizes drawn from the image."""
    try:
        return decode_image(value, field, 1 << 30)
    except JobError:
        print(f"note: {field} not decoded here; sizes assume an 832x480 image", file=sys.stderr)
        return InputImage(data=b"", extension="png", width=832, height=480)


def _graph(args: argparse.Namespace) -> int:
    payload: Any = json.loads(sys.stdin.read() if args.request == "-" else args.request)
    if not isinstance(payload, dict):
        print("error: the request must be a JSON object", file=sys.stderr)
        return 2
    payload.setdefault("workflow", args.workflow)
    try:
        workflow, request = parse(payload)
        plan = workflow.plan(request, JobContext("cli"), _stand_in)
    except JobError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    if plan.lora_nodes:
        print("note: LoRA files are named by sha256 once the worker has fetched them; "
              "the graph shows placeholders", file=sys.stderr)
    print(json.dumps(plan.graph, indent=1, ensure_ascii=False))
    return 0


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")


def _serve(args: argparse.Namespace) -> int:
    from .api.serve import serve  # the worker and its server: imported only to run them

    serve(args.host, args.port, os.environ.get("DIFFBOX_API_KEY"))
    return 0


COMMANDS: dict[str, Command] = {
    "schema": Command("print the JSON Schema of a job's input", _schema_arguments, _schema, (
        "diffbox schema                 # every request, as one schema",
        "diffbox schema i2v             # the fields a workflow takes",
    )),
    "graph": Command("print the ComfyUI graph a request becomes, without running it", _graph_arguments, _graph, (
        "diffbox graph i2v '{\"image\": \"cat.png\", \"prompt\": \"the cat walks\"}'",
        "diffbox graph qwen_edit - < request.json   # the request from stdin",
    )),
    "run": Command("run a job on an endpoint with live progress, and save its outputs",
                   client_cli.run_arguments, client_cli.run, (
        "diffbox run i2v --image cat.jpg --prompt \"the cat walks to the window\" --preset fast --out ./out",
        "diffbox run qwen_edit --image room.png --image lamp.png --prompt \"put the lamp on the table\"",
        "diffbox run svi --image cat.jpg --prompt walks --prompt turns --prompt \"sits down\" --frames 81",
        "diffbox run i2v --image cat.jpg --prompt jumps --lora hf://ORG/REPO/motion.safetensors:0.8:high",
        "diffbox run --input test_input.json --out ./out   # a whole request: a RunPod body, a request or a graph",
        "diffbox run i2v --input base.json --set seed=7 --set output.store=inline   # any field",
        "diffbox run --endpoint local --input test_input.json   # a worker in this process (make run)",
    )),
    "chat": Command("chat with an endpoint's model, the answer streamed", client_cli.chat_arguments, client_cli.chat, (
        "diffbox chat \"a prompt for a video of a cat at a window\" --preset i2v_prompt",
        "diffbox chat --messages conversation.json --no-stream --json",
    )),
    "serve": Command("serve RunPod's endpoint API (/run, /runsync, /status, /stream, /cancel) with jobs run "
                     "by a worker in this process, configured by the DIFFBOX_* settings (DIFFBOX_API_KEY: "
                     "the key callers must send)", _serve_arguments, _serve, (
        "diffbox serve --port 8000      # with DIFFBOX_COMFYUI_DIR or DIFFBOX_COMFYUI_URL set",
        "diffbox run --endpoint http://127.0.0.1:8000 --input test_input.json   # then, from another terminal",
    )),
}

# Under `diffbox --help`: what README.md's "One request" and docs/calling.md say in brief.
EPILOG = """endpoints (--endpoint or DIFFBOX_ENDPOINT):
  abc123, runpod:abc123        a RunPod endpoint id (key: RUNPOD_API_KEY)
  https://...                  any URL with RunPod's API: the Modal web endpoint, `diffbox serve`
                               (key: DIFFBOX_API_KEY, else RUNPOD_API_KEY)
  modal:diffbox/Worker         a Modal deployment, through Modal's client
  local                        a worker in this process, from the DIFFBOX_* settings

{exits}

`diffbox COMMAND --help` shows each command's options and examples; docs/calling.md has more.""".format(
    exits=textwrap.fill("exit status of run and chat: " + (exits.__doc__ or "").split("\n\n")[1], width=96))


def _examples(lines: tuple[str, ...]) -> str | None:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines) if lines else None


def build_parser(prog: str = "diffbox") -> argparse.ArgumentParser:
    layout = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0] if __doc__ else None,
                                     epilog=EPILOG, formatter_class=layout)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.arguments(commands.add_parser(name, help=command.help, description=command.help,
                                              epilog=_examples(command.examples), formatter_class=layout))
    return parser


def main(argv: list[str] | None = None) -> int:
    # The console script says `diffbox`; `python -m diffbox` says what it is.
    prog = "diffbox" if Path(sys.argv[0]).name == "diffbox" else "python -m diffbox"
    args = build_parser(prog).parse_args(argv)
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
