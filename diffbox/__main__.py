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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .client import cli as client_cli
from .errors import JobError
from .inputs.media import InputImage, decode_image
from .workflows import CHAT_DROP_IN, NAMED, RAW, parse
from .workflows.base import JobContext


@dataclass(frozen=True)
class Command:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


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
    "schema": Command("print the JSON Schema of a job's input", _schema_arguments, _schema),
    "graph": Command("print the ComfyUI graph a request becomes, without running it", _graph_arguments, _graph),
    "run": Command("run a job on an endpoint with live progress, and save its outputs",
                   client_cli.run_arguments, client_cli.run),
    "chat": Command("chat with an endpoint's model, the answer streamed", client_cli.chat_arguments, client_cli.chat),
    "serve": Command("serve RunPod's endpoint API (/run, /runsync, /status, /stream, /cancel) with jobs run "
                     "by a worker in this process, configured by the DIFFBOX_* settings (DIFFBOX_API_KEY: "
                     "the key callers must send)", _serve_arguments, _serve),
}


def main(argv: list[str] | None = None) -> int:
    # The console script says `diffbox`; `python -m diffbox` says what it is.
    prog = "diffbox" if Path(sys.argv[0]).name == "diffbox" else "python -m diffbox"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.arguments(commands.add_parser(name, help=command.help, description=command.help))
    args = parser.parse_args(argv)
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
