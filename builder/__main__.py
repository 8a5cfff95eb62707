"""`python -m builder plan|download|verify|paths|comfyui`: see docs/weights.md."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from diffbox.model_lock import LOCK_NAME
from diffbox.model_paths import CONFIG_NAME, chat_model_dir, write_extra_model_paths
from diffbox.workflows import manifest as manifest_module
from diffbox.workflows.graph import WORKFLOWS_DIR

from . import BuildError, comfyui, local_source, weights


def _csv(value: str) -> list[str] | None:
    """A comma-separated option; "all" means no filter, "none" an empty selection."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if parts == ["all"]:
        return None
    return [] if parts == ["none"] else parts


def _selection(args: argparse.Namespace) -> list[manifest_module.ModelFile]:
    manifest = manifest_module.load(args.manifest)
    workflows = _csv(args.workflows)
    if workflows == []:
        return []
    return weights.select(manifest, workflows, _csv(args.presets))


def _plan(args: argparse.Namespace) -> int:
    files = _selection(args)
    estimate = sum(f.size for f in files)
    if args.json:
        entries = [{"key": f.key, "repo": f.repo, "revision": f.revision, "path": f.path, "folder": f.folder,
                    "size_estimate": f.size} for f in files]
        print(json.dumps({"files": entries, "total_bytes_estimate": estimate}, indent=1))
        return 0
    rows = [[f.repo, f.revision, f.path, f.folder, weights.human_size(f.size)] for f in files]
    print(weights.table(["repo", "revision", "path", "folder", "size (estimate)"], rows))
    print(f"\n{len(files)} files, about {weights.human_size(estimate)} ({estimate} bytes, estimated; "
          f"the lock records the real sizes)")
    return 0


def _download(args: argparse.Namespace) -> int:
    files = _selection(args)
    dest: Path = args.dest
    pins = weights.read_lock(args.locked) if args.locked else None
    outcomes = weights.download(files, dest, workers=args.workers, pins=pins)
    problems = [[o.file.repo, o.file.revision, o.file.path, o.detail] for o in outcomes
                if o.status in ("failed", "held")]
    if args.chat_model:
        repo, revision = weights.parse_repo_ref(args.chat_model)
        print(f"chat model: {repo}@{revision} -> {chat_model_dir(dest, repo)}", flush=True)
        try:
            weights.download_chat_model(repo, revision, dest, workers=args.workers)
        except Exception as exc:
            problems.append([repo, revision, "(snapshot)", weights.describe_hub_error(exc, repo, revision)])
    write_extra_model_paths(dest, dest / CONFIG_NAME, (f.folder for f in files))
    fetched = sum(o.size for o in outcomes if o.status == "downloaded")
    placed = sum(o.status in ("present", "adopted", "downloaded") for o in outcomes)
    print(f"{placed} of {len(outcomes)} files in place under {dest} ({weights.human_size(fetched)} fetched now); "
          f"lock: {dest / LOCK_NAME}")
    if problems:
        print("\nnot downloaded:\n" + weights.table(["repo", "revision", "path", "problem"], problems), file=sys.stderr)
        return 1
    return 0


def _verify(args: argparse.Namespace) -> int:
    lock = weights.read_lock(args.lock or args.dest / LOCK_NAME)
    checks = list(weights.verify(_selection(args), args.dest, lock, hashes=not args.no_hash))
    bad = [c for c in checks if not c.ok]
    shown = checks if args.all else bad
    if shown:
        rows = [[c.status, f"{c.file.folder}/{c.file.name}", "" if c.entry is None else str(c.entry.size),
                 "" if c.actual_size is None else str(c.actual_size), c.detail] for c in shown]
        print(weights.table(["status", "file", "locked bytes", "bytes", "detail"], rows))
    print(f"{len(checks) - len(bad)} of {len(checks)} files ok under {args.dest}")
    return 1 if bad else 0


def _paths(args: argparse.Namespace) -> int:
    manifest = manifest_module.load(args.manifest)
    out = write_extra_model_paths(args.dest, args.out or args.dest / CONFIG_NAME,
                                  (f.folder for f in manifest.files.values()))
    print(out)
    return 0


def _comfyui(args: argparse.Namespace) -> int:
    torch = tuple(args.torch.split()) if args.torch else comfyui.TORCH_PACKAGES
    sources = args.source or local_source.from_environment()
    folder = comfyui.install(args.dest, pins=args.pins, cpu=args.cpu, torch_index=args.torch_index,
                             torch_packages=torch, deps=not args.no_deps_install, sources=sources,
                             installer=args.installer)
    print(f"ComfyUI ready in {folder}" + ("" if args.no_deps_install else f", python {args.dest / 'venv/bin/python'}"))
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m builder", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    def selection(p: argparse.ArgumentParser) -> None:
        p.add_argument("--workflows", default="all",
                       help="comma-separated: i2v, svi, qwen_edit (every variant) or qwen_edit:2511; all; none")
        p.add_argument("--presets", default="all", help="comma-separated: fast, quality; all")
        p.add_argument("--manifest", type=Path, default=WORKFLOWS_DIR / "models.json")

    p = sub.add_parser("plan", help="list the files a selection needs, and their estimated total size")
    selection(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_plan)

    p = sub.add_parser("download", help=f"fetch the files into ComfyUI's folder layout under --dest, "
                                        f"recorded in DEST/{LOCK_NAME}")
    selection(p)
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--locked", type=Path, metavar="LOCKFILE",
                   help="fetch exactly the commits and bytes in this lock; refuse any drift")
    p.add_argument("--workers", type=int, default=4, help="files fetched in parallel")
    p.add_argument("--chat-model", metavar="REPO[@REV]", help="also a vLLM model snapshot, under DEST/llm/REPO")
    p.set_defaults(run=_download)

    p = sub.add_parser("verify", help="check the files under --dest against a lock: presence, size, sha256")
    selection(p)
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--lock", type=Path, metavar="LOCKFILE", help=f"default: DEST/{LOCK_NAME}")
    p.add_argument("--no-hash", action="store_true", help="sizes only (hashing reads every byte)")
    p.add_argument("--all", action="store_true", help="list good files too")
    p.set_defaults(run=_verify)

    p = sub.add_parser("paths", help=f"write ComfyUI's {CONFIG_NAME} for --dest")
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--out", type=Path, help=f"default: DEST/{CONFIG_NAME}")
    p.add_argument("--manifest", type=Path, default=WORKFLOWS_DIR / "models.json")
    p.set_defaults(run=_paths)

    p = sub.add_parser("comfyui", help="ComfyUI and custom nodes at their pinned commits, and a venv")
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--pins", type=Path, default=comfyui.PINS)
    p.add_argument("--cpu", action="store_true", help=f"torch from {comfyui.TORCH_CPU_INDEX}")
    p.add_argument("--torch-index", help="install torch from this index first (e.g. .../whl/cu128); "
                   f"{comfyui.DEFAULT_INDEX!r}: from the installer's own index (PyPI or its mirror)")
    p.add_argument("--torch", help=f"torch packages, space-separated (default: {' '.join(comfyui.TORCH_PACKAGES)})")
    p.add_argument("--no-deps-install", action="store_true", help="clone only: no venv, no pip")
    p.add_argument("--installer", choices=comfyui.INSTALLERS,
                   help="what installs into the venv (default: uv when on PATH, else pip); pip reads pip.conf")
    p.add_argument("--source", type=Path, action="append", metavar="DIR_OR_ARCHIVE",
                   help="take checkouts from here, not GitHub (repeatable): NAME-COMMIT.tar.gz archives "
                   "(top folder NAME), trees in folders named NAME, or folders holding them; "
                   f"default: ${local_source.ENV_VAR} (paths separated by {os.pathsep!r})")
    p.set_defaults(run=_comfyui)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
