"""`python -m builder comfyui` against git repositories the test makes (GitHub is out of reach)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from builder import comfyui
from builder.__main__ import main


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                            capture_output=True, text=True, check=True)
    return result.stdout.strip()


def _repo(path: Path, files: dict[str, str]) -> str:
    if not path.exists():
        path.mkdir(parents=True)
        _git(path, "init", "-q")
    for name, text in files.items():
        (path / name).write_text(text)
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "change")
    return _git(path, "rev-parse", "HEAD")


@pytest.fixture
def upstream(tmp_path: Path) -> dict[str, str]:
    src = tmp_path / "upstream"
    return {
        "comfy_v1": _repo(src / "ComfyUI", {"main.py": "v1\n", "requirements.txt": "# torch\n"}),
        "comfy_v2": _repo(src / "ComfyUI", {"main.py": "v2\n"}),
        "kj": _repo(src / "KJNodes", {"nodes.py": "kj\n", "requirements.txt": "# opencv\n"}),
        "other": _repo(src / "Other", {"nodes.py": "other\n"}),
        "root": str(src),
    }


def _pins(tmp_path: Path, upstream: dict[str, str], comfy: str) -> Path:
    root = upstream["root"]
    pins = {"comfyui": {"repo": f"file://{root}/ComfyUI", "ref": "v0.0.1", "commit": upstream[comfy]},
            "custom_nodes": [{"name": "ComfyUI-KJNodes", "repo": f"file://{root}/KJNodes", "commit": upstream["kj"]},
                             # A plain path works as well as a URL.
                             {"name": "Other", "repo": f"{root}/Other", "commit": upstream["other"]}]}
    path = tmp_path / "comfyui.json"
    path.write_text(json.dumps(pins))
    return path


def _head(repo: Path) -> str:
    return _git(repo, "rev-parse", "HEAD")


def test_clones_comfyui_and_nodes_at_their_pinned_commits(
    tmp_path: Path, upstream: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / ".comfyui"
    args = ["comfyui", "--dest", str(dest), "--no-deps-install"]
    assert main([*args, "--pins", str(_pins(tmp_path, upstream, "comfy_v1"))]) == 0
    comfy = dest / "ComfyUI"
    # Pinned to the older commit although the upstream branch has moved on.
    assert _head(comfy) == upstream["comfy_v1"] and (comfy / "main.py").read_text() == "v1\n"
    assert _head(comfy / "custom_nodes" / "ComfyUI-KJNodes") == upstream["kj"]
    assert (comfy / "custom_nodes" / "Other" / "nodes.py").read_text() == "other\n"
    assert not (dest / "venv").exists()
    capsys.readouterr()

    assert main([*args, "--pins", str(_pins(tmp_path, upstream, "comfy_v1"))]) == 0
    assert "git -C" not in capsys.readouterr().out  # nothing fetched the second time

    assert main([*args, "--pins", str(_pins(tmp_path, upstream, "comfy_v2"))]) == 0
    assert _head(comfy) == upstream["comfy_v2"] and (comfy / "main.py").read_text() == "v2\n"


def test_an_unknown_commit_fails_with_the_command(
    tmp_path: Path, upstream: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    upstream = {**upstream, "comfy_v1": "0" * 40}
    pins = _pins(tmp_path, upstream, "comfy_v1")
    assert main(["comfyui", "--dest", str(tmp_path / "d"), "--pins", str(pins), "--no-deps-install"]) == 2
    assert f"checkout -q --detach {'0' * 40}` failed" in capsys.readouterr().err


def test_deps_go_into_a_venv_torch_first_then_all_requirements_at_once(
    tmp_path: Path, upstream: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / ".comfyui"
    comfyui.install(dest, pins=_pins(tmp_path, upstream, "comfy_v1"), deps=False)
    seen: list[list[str]] = []
    real_run = comfyui._run

    def recording_run(argv: list[str], cwd: Path | None = None, quiet: bool = False) -> object:
        seen.append([str(a) for a in argv])
        # Make the venv for real; leave the package index alone.
        return real_run(argv, cwd, quiet) if "venv" in argv else None

    monkeypatch.setattr(comfyui, "_run", recording_run)
    comfy = dest / "ComfyUI"
    nodes = [comfy / "custom_nodes" / "ComfyUI-KJNodes", comfy / "custom_nodes" / "Other"]
    python = comfyui.install_deps(dest, comfy, nodes, comfyui.TORCH_CPU_INDEX, comfyui.TORCH_PACKAGES)
    assert python == dest / "venv" / "bin" / "python" and python.exists()
    installs = [argv for argv in seen if "install" in argv]
    assert installs[0][-5:] == [*comfyui.TORCH_PACKAGES, "--index-url", comfyui.TORCH_CPU_INDEX]
    # One resolution for ComfyUI's and every node's requirements (Other has none).
    assert installs[1][-4:] == ["-r", str(comfy / "requirements.txt"), "-r", str(nodes[0] / "requirements.txt")]

    seen.clear()
    comfyui.install_deps(dest, comfy, nodes, comfyui.TORCH_CPU_INDEX, comfyui.TORCH_PACKAGES)
    assert seen == []  # unchanged requirements: nothing reinstalled
    (nodes[0] / "requirements.txt").write_text("# opencv\n# changed\n")
    comfyui.install_deps(dest, comfy, nodes, comfyui.TORCH_CPU_INDEX, comfyui.TORCH_PACKAGES)
    assert [argv for argv in seen if "install" in argv]


def test_the_repository_pins_name_comfyui_and_kjnodes_by_commit() -> None:
    core, nodes = comfyui.load_pins()
    assert core.repo == "https://github.com/Comfy-Org/ComfyUI" and len(core.commit) == 40
    assert "ComfyUI-KJNodes" in {n.name for n in nodes}
    assert all(len(n.commit) == 40 for n in nodes)
