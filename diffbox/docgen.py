"""The parts of the docs that are facts about the code, written from the code so they cannot drift.

    uv run python -m diffbox.docgen           write them
    uv run python -m diffbox.docgen --check   list what differs, exit 1 if anything does

Pages hold hand-written prose around blocks this writes:
`<!-- generated: NAME -->` ... `<!-- end generated -->` (the configuration tables from
`Settings`, the API's fields from the pydantic request and result models). RunPod's Hub files,
`.runpod/hub.json` and `.runpod/tests.json`, are written whole (hub.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from . import hub
from .config import S3Settings, Settings, env_of
from .schemas import Output, Progress
from .workflows import CHAT_DROP_IN, NAMED, RAW

ROOT = Path(__file__).resolve().parent.parent
# Defaults longer than this are not printed in a table cell.
LONG = 60
BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def default_text(field: Any) -> str:
    """A setting's default as the docs say it."""
    spec = env_of(field)
    if "shown" in spec:
        return str(spec["shown"])
    value = field.get_default(call_default_factory=False)
    if value is None or value == [] or value == "" or value is PydanticUndefined:
        return "none"
    if isinstance(value, bool):
        return "`1`" if value else "`0`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return f"`{value}`"


def settings_table(model: type[BaseModel]) -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for field in model.model_fields.values():
        spec = env_of(field)
        if "env" not in spec:
            continue
        names = f"`{spec['env']}`" + "".join(f", else `{name}`" for name in spec["also"])
        rows.append(f"| {names} | {_cell(default_text(field))} | {_cell(field.description or '')} |")
    return "\n".join(rows) + "\n"


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return f"[{schema['$ref'].rsplit('/', 1)[-1]}](#{schema['$ref'].rsplit('/', 1)[-1].lower()})"
    if "anyOf" in schema:
        kinds = [_type(s) for s in schema["anyOf"] if s.get("type") != "null"]
        return " or ".join(kinds)
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {_type(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema and isinstance(schema["additionalProperties"], dict):
        return f"object of {_type(schema['additionalProperties'])}"
    return str(kind)


_BOUNDS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<",
           "minLength": "length >=", "maxLength": "length <=", "minItems": "items >=", "maxItems": "items <="}


def _limits(schema: dict[str, Any]) -> str:
    parts: list[str] = []
    for variant in [schema, *schema.get("anyOf", [])]:
        parts += [f"{sign} {variant[key]}" for key, sign in _BOUNDS.items() if key in variant]
    return ", ".join(parts)


def fields_table(schema: dict[str, Any]) -> str:
    rows = ["| field | type | default | limits | meaning |", "|---|---|---|---|---|"]
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        if name in required:
            default = "required"
        elif "default" in prop and len(shown := json.dumps(prop["default"], ensure_ascii=False)) <= LONG:
            default = "none" if prop["default"] is None else f"`{shown}`"
        elif "default" in prop:
            default = "a built-in text (`python -m diffbox schema` shows it)"
        else:
            default = "optional"
        rows.append(f"| `{name}` | {_type(prop)} | {_cell(default)} | {_limits(prop)} | "
                    f"{_cell(prop.get('description', ''))} |")
    return "\n".join(rows) + "\n"


def _models_section(models: Iterable[tuple[str, type[BaseModel]]], level: str = "####") -> str:
    """A table per model, then one per model they refer to (each once, by name)."""
    parts: list[str] = []
    shared: dict[str, dict[str, Any]] = {}
    for title, model in models:
        schema = model.model_json_schema()
        shared.update(schema.pop("$defs", {}))
        # A docstring's pointers into the design brief stay in the code.
        doc = re.sub(r" \(DESIGN\.md[^)]*\)", "", (model.__doc__ or "").strip().split("\n\n")[0])
        parts.append(f"{level} {title}\n\n" + (f"{_cell(doc)}\n\n" if doc and not doc.startswith("!") else "")
                     + fields_table(schema))
    for name in sorted(shared):
        doc = shared[name].get("description", "")
        parts.append(f"{level} {name}\n\n" + (f"{_cell(doc)}\n\n" if doc else "") + fields_table(shared[name]))
    return "\n".join(parts)


def requests_section() -> str:
    models = [(f"`{name}`", w.request) for name, w in NAMED.items()]
    models += [("raw graph", RAW.request), ("chat as worker-vllm takes it", CHAT_DROP_IN.request)]
    return _models_section(models)


def results_section() -> str:
    return _models_section([("Output", Output), ("Progress", Progress)])


BLOCKS: dict[str, Callable[[], str]] = {
    "settings": lambda: settings_table(Settings),
    "s3-settings": lambda: settings_table(S3Settings),
    "requests": requests_section,
    "results": results_section,
}


def render_page(text: str) -> str:
    """The page with each generated block written anew."""
    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise KeyError(f"unknown generated block {name!r}; known: {', '.join(BLOCKS)}")
        return match[1] + BLOCKS[name]() + match[4]

    return BLOCK.sub(fill, text)


def expected(root: Path = ROOT) -> dict[Path, str]:
    """Every generated file, or page with generated blocks, as it should be."""
    files: dict[Path, str] = {}
    for page in sorted((root / "docs").glob("*.md")):
        text = page.read_text()
        if BLOCK.search(text):
            files[page] = render_page(text)
    files.update({root / path: text for path, text in hub.files(root).items()})
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffbox.docgen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs")
    args = parser.parse_args(argv)
    files = expected()
    drifted = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
    for path in drifted:
        if args.check:
            print(f"{path.relative_to(ROOT)}: differs from what `python -m diffbox.docgen` writes", file=sys.stderr)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(files[path])
            print(f"wrote {path.relative_to(ROOT)}")
    return 1 if drifted and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
