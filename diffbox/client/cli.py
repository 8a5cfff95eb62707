"""`diffbox run` and `diffbox chat`: jobs on an endpoint from a terminal.

Exit statuses: exits.py. display.py (rich) is imported only when a command runs, so
`diffbox schema` needs no rich.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .client import Client
from .errors import ClientError
from .exits import EXIT_INTERRUPTED
from .job import Job
from .uploads import UPLOAD_MODES

if TYPE_CHECKING:
    from .display import RunDisplay

# How long Ctrl-C waits for the endpoint to confirm a cancel; a second Ctrl-C stops waiting.
CANCEL_WAIT_S = 30.0


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", default=os.environ.get("DIFFBOX_ENDPOINT"),
                        help="a RunPod endpoint id, a base URL with RunPod's API (`python -m diffbox serve`, "
                             "the Modal web endpoint), modal:APP/CLASS, or local (a worker in this process, "
                             "from the DIFFBOX_* settings); default DIFFBOX_ENDPOINT")
    parser.add_argument("--api-key", help="default DIFFBOX_API_KEY (URLs), else RUNPOD_API_KEY")
    parser.add_argument("--input", help="a whole request as JSON: a file, or '-' for stdin; a RunPod body "
                                        "({\"input\": ...}) and a bare ComfyUI graph work too; flags override it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any request field (dotted for nested ones: output.store=inline); VALUE is read as "
                             "JSON when it is JSON (17, true, [\"a\"]), else as text")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout; no live display")
    parser.add_argument("--timeout", type=float, help="seconds to wait for the job (exit 124 then; it goes on)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between status requests (default 1)")


def run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workflow", nargs="?", help="i2v, svi, qwen_edit, chat, or raw (a graph from --input); "
                                                    "default: the --input request's")
    parser.add_argument("--image", action="append", default=[],
                        help="an input image: a local file (sent inline, or to S3 when DIFFBOX_S3_* is set), an "
                             "https:// or s3:// URL; repeat for qwen_edit's images and a raw graph's")
    parser.add_argument("--prompt", action="append", default=[], help="the prompt; repeat for svi (one per clip)")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--preset", choices=["fast", "quality"])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--frames", type=int, help="video frames (svi: frames per clip)")
    parser.add_argument("--lora", action="append", default=[], type=lora_entry, metavar="SOURCE[:STRENGTH[:TARGET]]",
                        help="a LoRA the worker fetches and caches: hf://ORG/REPO/PATH.safetensors[@REVISION], an "
                             "https:// URL or s3://BUCKET/KEY; strength (default 1), and for Wan the expert: "
                             "high, low or both (default); repeat for up to 4")
    parser.add_argument("--out", type=Path, default=Path("."), help="where outputs are saved (default: here)")
    parser.add_argument("--no-download", action="store_true", help="print the result only")
    parser.add_argument("--upload", choices=UPLOAD_MODES, default="auto",
                        help="how local files travel: inline data URIs, s3:// URIs in the DIFFBOX_S3_* bucket, "
                             "or presigned URLs to it; auto: s3 when DIFFBOX_S3_BUCKET is set, else inline")
    _common_arguments(parser)


def chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the message (default: standard input, when it is not a terminal)")
    parser.add_argument("--system", help="a system message before it")
    parser.add_argument("--messages", help="a JSON file with the conversation in OpenAI's format, instead")
    parser.add_argument("--preset", help="a system prompt of the worker's: i2v_prompt or edit_prompt")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-stream", action="store_true", help="ask for the whole answer at once")
    _common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from .display import RunDisplay

    display = RunDisplay(machine=args.json)
    job = _submit(display, lambda: Client(args.endpoint, api_key=args.api_key, poll_s=args.poll,
                                          upload=args.upload).submit(run_request(args)))
    if isinstance(job, int):
        return job

    def follow() -> dict[str, Any]:
        with display.live(job):
            for update in job.progress(args.timeout):
                display.progress(update)
            return job.result()

    result = _watch(job, display, follow)
    if isinstance(result, int):
        return result
    try:
        paths = [] if args.no_download else job.download(args.out)
    except ClientError as err:
        return display.failed(job, err)
    display.summary(job, result, paths)
    return 0


def chat(args: argparse.Namespace) -> int:
    from .display import RunDisplay

    display = RunDisplay(machine=args.json)
    streamed = not (args.no_stream or args.json)
    job = _submit(display, lambda: Client(args.endpoint, api_key=args.api_key, poll_s=args.poll)
                  .submit(chat_request(args, streamed)))
    if isinstance(job, int):
        return job

    def follow() -> dict[str, Any]:
        if streamed:
            for chunk in job.stream(args.timeout):
                # A chunk with `text` instead of a delta: the endpoint could not stream.
                display.write(str(chunk.get("delta", chunk.get("text", ""))) if isinstance(chunk, dict) else str(chunk))
        return job.result(args.timeout)

    result = _watch(job, display, follow)
    if isinstance(result, int):
        return result
    display.chat_done(job, result, streamed)
    return 0


def _submit(display: RunDisplay, submit: Callable[[], Job]) -> Job | int:
    """The submitted job, or the exit code of a request refused or failed on the way."""
    try:
        return submit()
    except (ValueError, OSError) as err:  # InvalidRequest is a ValueError
        return display.refused(err)
    except ClientError as err:
        return display.failed(None, err)


def _watch(job: Job, display: RunDisplay, follow: Callable[[], dict[str, Any]]) -> dict[str, Any] | int:
    """The job's result, or the exit code when it failed, timed out or Ctrl-C cancelled it."""
    try:
        return follow()
    except KeyboardInterrupt:
        return _cancel(job, display.note)
    except TimeoutError:
        return display.timed_out(job)
    except ClientError as err:
        return display.failed(job, err)


def lora_entry(value: str) -> dict[str, Any]:
    """`SOURCE[:STRENGTH[:TARGET]]` as a request's `loras` entry (read from the right: sources hold colons)."""
    entry: dict[str, Any] = {}
    source, _, last = value.rpartition(":")
    if source and last in ("high", "low", "both"):
        entry["target"], value = last, source
    source, _, last = value.rpartition(":")
    try:
        strength = float(last)
    except ValueError:
        strength = None
    if "://" in source and strength is not None:
        entry["strength"], value = strength, source
    return {"source": value, **entry}


def run_request(args: argparse.Namespace) -> dict[str, Any]:
    """The request that `diffbox run`'s arguments describe."""
    request = _input(args.input)
    if args.workflow == "raw":
        if not isinstance(request.get("workflow"), dict):
            raise ValueError("raw: give the graph with --input (an API-format graph, or a request with `workflow`)")
    elif args.workflow:
        request["workflow"] = args.workflow
    kind = "raw" if isinstance(request.get("workflow"), dict) else request.get("workflow")
    if args.image:
        if kind == "raw":
            request["images"] = [*request.get("images", []),
                                 *({"name": Path(image).name, "image": image} for image in args.image)]
        elif kind == "qwen_edit":
            request["images"] = args.image
        elif len(args.image) == 1:
            request["image"] = args.image[0]
        else:
            raise ValueError(f"{kind}: one --image (a last frame goes with --set end_image=...)")
    if args.prompt:
        if kind == "svi" and len(args.prompt) > 1:
            request["prompts"] = args.prompt
        elif len(args.prompt) == 1:
            request["prompt"] = args.prompt[0]
        else:
            raise ValueError(f"{kind}: one --prompt (svi takes one per clip)")
    frames = "frames_per_clip" if kind == "svi" else "frames"
    for field, value in (("negative_prompt", args.negative_prompt), ("preset", args.preset), ("seed", args.seed),
                         ("width", args.width), ("height", args.height), (frames, args.frames)):
        if value is not None:
            request[field] = value
    if args.lora:
        request["loras"] = [*request.get("loras", []), *args.lora]
    return _with_settings(request, args.set)


def chat_request(args: argparse.Namespace, streamed: bool) -> dict[str, Any]:
    """The request that `diffbox chat`'s arguments describe."""
    request = _input(args.input)
    request["workflow"] = "chat"
    if args.messages:
        request["messages"] = json.loads(Path(args.messages).read_text())
    prompt = args.prompt
    if prompt is None and "messages" not in request and "prompt" not in request and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
    if prompt is not None:
        request["prompt"] = prompt
    if args.system is not None or ("messages" in request and "prompt" in request):
        # One conversation: the system message, what came before, the new message.
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        user = [{"role": "user", "content": request.pop("prompt")}] if "prompt" in request else []
        request["messages"] = [*system, *request.get("messages", []), *user]
    for field, value in (("preset", args.preset), ("max_tokens", args.max_tokens),
                         ("temperature", args.temperature), ("seed", args.seed)):
        if value is not None:
            request[field] = value
    request["stream"] = streamed
    return _with_settings(request, args.set)


def _input(source: str | None) -> dict[str, Any]:
    if source is None:
        return {}
    data = json.loads(sys.stdin.read() if source == "-" else Path(source).read_text())
    if isinstance(data, dict) and set(data) == {"input"}:
        data = data["input"]  # a RunPod request body, as test_input.json is
    if not isinstance(data, dict):
        raise ValueError("--input: expected a JSON object")
    if "workflow" not in data and data and all(isinstance(n, dict) and "class_type" in n for n in data.values()):
        return {"workflow": data}  # a bare API-format graph
    return data


def _with_settings(request: dict[str, Any], settings: list[str]) -> dict[str, Any]:
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {setting!r}: expected KEY=VALUE")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        *parents, leaf = key.split(".")
        target = request
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {key}: {part} is not an object")
        target[leaf] = value
    return request


def _cancel(job: Job, note: Callable[[str], None]) -> int:
    note(f"interrupted: cancelling job {job.id}")
    try:
        job.cancel()
        job.wait(CANCEL_WAIT_S)
        note(f"job {job.id}: {job.status}")
    except KeyboardInterrupt:
        note(f"job {job.id}: stopped waiting for the cancel to be confirmed")
    except TimeoutError:
        note(f"job {job.id}: the endpoint has not confirmed the cancel yet ({job.status})")
    except ClientError as err:
        note(f"job {job.id}: could not cancel it: {err}")
    return EXIT_INTERRUPTED

