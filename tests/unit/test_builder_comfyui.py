"""`python -m builder comfyui` against git repositories the test makes (GitHub is out of reach)."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
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


@pytest.fixture(autouse=True)
def no_ambient_source(monkeypatch: pytest.MonkeyPatch) -> None:
    # .ci/run sets it for the whole suite; these tests choose their sources themselves.
    monkeypatch.delenv("DIFFBOX_COMFYUI_SOURCE", raising=False)


@pytest.fixture
def upstream(tmp_path: Path) -> dict[str, str]:
    src = tmp_path / "upstream"
    return {
        "comfy_v1": _repo(src / "ComfyUI", {"main.py": "v1\n", "requirements.txt": "torch\ntorchaudio\nnumpy>=1.25\n"}),
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
    # One resolution for ComfyUI's and every node's requirements (Other has none), without the
    # torch lines: the torch installed first stays.
    merged = dest / "venv" / "requirements.diffbox.txt"
    assert installs[1][-3:] == ["-r", str(merged), *comfyui.UNDECLARED]
    assert merged.read_text().splitlines() == ["numpy>=1.25", "# opencv"]

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


def _archive(path: Path, top: str, files: dict[str, str]) -> Path:
    """A `git archive --prefix=TOP/`-shaped .tar.gz."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("python", ["with tar filters", "before 3.11.4, without them"])
def test_local_archives_replace_github_and_say_when_they_are_not_the_pin(
    tmp_path: Path, upstream: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    python: str,
) -> None:
    if python.startswith("before"):
        monkeypatch.delattr(tarfile, "data_filter")
    pins = _pins(tmp_path, upstream, "comfy_v1")
    src = tmp_path / "src"
    src.mkdir()
    _archive(src / "ComfyUI-a125cd8.tar.gz", "ComfyUI", {"main.py": "archived\n"})
    # The node archive at its pinned commit; a ComfyUI-prefixed name is not taken for ComfyUI.
    _archive(src / f"ComfyUI-KJNodes-{upstream['kj'][:7]}.tar.gz", "ComfyUI-KJNodes", {"nodes.py": "kj archived\n"})
    # A node given as a plain tree, in a folder named as the checkout.
    _repo(tmp_path / "trees" / "Other", {"nodes.py": "other tree\n"})
    dest = tmp_path / ".comfyui"
    args = ["comfyui", "--dest", str(dest), "--pins", str(pins), "--no-deps-install"]
    monkeypatch.setenv("DIFFBOX_COMFYUI_SOURCE", f"{src}:{tmp_path / 'trees' / 'Other'}")
    assert main(args) == 0
    out = capsys.readouterr().out
    comfy = dest / "ComfyUI"
    assert (comfy / "main.py").read_text() == "archived\n"
    assert (comfy / "custom_nodes" / "ComfyUI-KJNodes" / "nodes.py").read_text() == "kj archived\n"
    assert (comfy / "custom_nodes" / "Other" / "nodes.py").read_text() == "other tree\n"
    assert not (comfy / "custom_nodes" / "Other" / ".git").exists()
    assert f"commit a125cd8, NOT the pinned {upstream['comfy_v1'][:12]}" in out
    assert f"the pinned commit {upstream['kj'][:12]}" in out
    assert "git " not in out  # nothing from the network

    assert main(args) == 0
    assert "already from" in capsys.readouterr().out
    assert (comfy / "custom_nodes" / "Other" / "nodes.py").is_file()


def test_a_checkout_missing_from_the_sources_fails_naming_it(
    tmp_path: Path, upstream: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _archive(src / "ComfyUI-a125cd8.tar.gz", "ComfyUI", {"main.py": "archived\n"})
    args = ["comfyui", "--dest", str(tmp_path / "d"), "--pins", str(_pins(tmp_path, upstream, "comfy_v1")),
            "--no-deps-install", "--source", str(src)]
    assert main(args) == 2
    assert "no source for ComfyUI-KJNodes" in capsys.readouterr().err


def test_an_unreachable_repository_says_how_to_install_without_github(
    tmp_path: Path, upstream: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    pins = json.loads(_pins(tmp_path, upstream, "comfy_v1").read_text())
    pins["comfyui"]["repo"] = f"file://{tmp_path}/nowhere"
    (tmp_path / "gone.json").write_text(json.dumps(pins))
    assert main(["comfyui", "--dest", str(tmp_path / "d"), "--pins", str(tmp_path / "gone.json"),
                 "--no-deps-install"]) == 2
    assert "--source DIR_OR_ARCHIVE or DIFFBOX_COMFYUI_SOURCE" in capsys.readouterr().err


@pytest.mark.parametrize("python", ["with tar filters", "before 3.11.4, without them"])
def test_an_archive_reaching_out_of_its_tree_is_refused(
    tmp_path: Path, upstream: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    python: str,
) -> None:
    if python.startswith("before"):  # Debian bookworm's 3.11.2, an image's system Python
        monkeypatch.delattr(tarfile, "data_filter")
    src = tmp_path / "src"
    src.mkdir()
    _archive(src / "ComfyUI-a125cd8.tar.gz", "ComfyUI", {"main.py": "x\n", "../../escaped.txt": "no\n"})
    args = ["comfyui", "--dest", str(tmp_path / "d"), "--pins", str(_pins(tmp_path, upstream, "comfy_v1")),
            "--no-deps-install", "--source", str(src)]
    assert main(args) == 2
    assert "ComfyUI-a125cd8.tar.gz: cannot unpack" in capsys.readouterr().err
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "d" / "escaped.txt").exists()
