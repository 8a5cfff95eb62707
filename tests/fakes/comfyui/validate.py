"""Node schemas and POST /prompt validation, as ComfyUI 0.3.64 answers them.

The schemas are the recorded `GET /object_info` (object_info.json) plus every *.json in
extra_schemas/, with the model and input-file COMBO lists filled from the disk on each use, so a
weight file dropped into models/ becomes a valid value at once, as in a real ComfyUI.

`validate_prompt` follows ComfyUI's `execution.validate_prompt` / `validate_inputs` statement by
statement, on the parsed JSON, so Python raises the same exceptions (KeyError '99', IndexError
'tuple index out of range', int('abc')...) and the answers carry the same texts. Where ComfyUI
iterates a set (input names, output nodes) the fake uses the schema's input order and the prompt's
node order: ComfyUI's order there is random per process.
"""

from __future__ import annotations

import copy
import json
import mimetypes
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OBJECT_INFO_PATH = HERE / "object_info.json"
EXTRA_SCHEMAS_DIR = HERE / "extra_schemas"

SUPPORTED_PT_EXTENSIONS = frozenset({".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"})

# GET /models lists these, in ComfyUI's order: (folders below the base directory, extensions).
# An empty extension set lets every file through, as ComfyUI's filter_files_extensions does.
MODEL_FOLDERS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "checkpoints": (("models/checkpoints",), SUPPORTED_PT_EXTENSIONS),
    "configs": (("models/configs",), frozenset({".yaml"})),
    "loras": (("models/loras",), SUPPORTED_PT_EXTENSIONS),
    "vae": (("models/vae",), SUPPORTED_PT_EXTENSIONS),
    "text_encoders": (("models/text_encoders", "models/clip"), SUPPORTED_PT_EXTENSIONS),
    "diffusion_models": (("models/unet", "models/diffusion_models"), SUPPORTED_PT_EXTENSIONS),
    "clip_vision": (("models/clip_vision",), SUPPORTED_PT_EXTENSIONS),
    "style_models": (("models/style_models",), SUPPORTED_PT_EXTENSIONS),
    "embeddings": (("models/embeddings",), SUPPORTED_PT_EXTENSIONS),
    "diffusers": (("models/diffusers",), frozenset({"folder"})),
    "vae_approx": (("models/vae_approx",), SUPPORTED_PT_EXTENSIONS),
    "controlnet": (("models/controlnet", "models/t2i_adapter"), SUPPORTED_PT_EXTENSIONS),
    "gligen": (("models/gligen",), SUPPORTED_PT_EXTENSIONS),
    "upscale_models": (("models/upscale_models",), SUPPORTED_PT_EXTENSIONS),
    "custom_nodes": (("custom_nodes",), frozenset()),
    "hypernetworks": (("models/hypernetworks",), SUPPORTED_PT_EXTENSIONS),
    "photomaker": (("models/photomaker",), SUPPORTED_PT_EXTENSIONS),
    "classifiers": (("models/classifiers",), frozenset({""})),
    "model_patches": (("models/model_patches",), SUPPORTED_PT_EXTENSIONS),
    "audio_encoders": (("models/audio_encoders",), SUPPORTED_PT_EXTENSIONS),
}
LEGACY_FOLDER_NAMES = {"unet": "diffusion_models", "clip": "text_encoders"}

# Which COMBO inputs list model files. The recorded object_info has these lists empty (no weights
# were installed); a few names mean different folders on different nodes.
MODEL_INPUTS_BY_CLASS: dict[tuple[str, str], str] = {
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("UpscaleModelLoader", "model_name"): "upscale_models",
    ("ModelPatchLoader", "name"): "model_patches",
    ("VAELoader", "vae_name"): "@vae_list",
    ("LoadImage", "image"): "@input_images",
    ("LoadImageMask", "image"): "@input_images",
}
MODEL_INPUTS_BY_NAME: dict[str, str] = {
    "ckpt_name": "checkpoints",
    "unet_name": "diffusion_models",
    "lora_name": "loras",
    "vae_name": "vae",
    "clip_name": "text_encoders",
    "clip_name1": "text_encoders",
    "clip_name2": "text_encoders",
    "clip_name3": "text_encoders",
    "clip_name4": "text_encoders",
    "control_net_name": "controlnet",
    "gligen_name": "gligen",
    "hypernetwork_name": "hypernetworks",
    "style_model_name": "style_models",
    "photomaker_model_name": "photomaker",
    "audio_encoder_name": "audio_encoders",
}
TAESD_NAMES = (("taesd", "taesd"), ("taesdxl", "taesdxl"), ("taesd3", "taesd3"), ("taef1", "taef1"))


@dataclass(frozen=True)
class Paths:
    """ComfyUI's folder_paths: base directory, input/output/temp and the models tree."""

    base: Path
    input: Path
    output: Path
    temp: Path

    @classmethod
    def create(
        cls, base: str | Path, input_dir: str | None = None, output_dir: str | None = None,
        temp_dir: str | None = None,
    ) -> Paths:
        root = Path(os.path.abspath(base))
        return cls(
            base=root,
            input=Path(os.path.abspath(input_dir)) if input_dir else root / "input",
            output=Path(os.path.abspath(output_dir)) if output_dir else root / "output",
            temp=Path(os.path.abspath(temp_dir)) if temp_dir else root / "temp",
        )

    @property
    def models(self) -> Path:
        return self.base / "models"

    def folder_dirs(self, folder: str) -> list[Path]:
        folder = LEGACY_FOLDER_NAMES.get(folder, folder)
        return [self.base / rel for rel in MODEL_FOLDERS[folder][0]]

    def directory_by_type(self, kind: str) -> Path | None:
        return {"output": self.output, "input": self.input, "temp": self.temp}.get(kind)

    def ensure(self) -> None:
        for path in (self.input, self.output, self.temp):
            path.mkdir(parents=True, exist_ok=True)
        for folder, (dirs, _) in MODEL_FOLDERS.items():
            if folder != "custom_nodes":
                (self.base / dirs[0]).mkdir(parents=True, exist_ok=True)


def filename_list(paths: Paths, folder: str) -> list[str]:
    """folder_paths.get_filename_list: every matching file below the folder's dirs, sorted."""
    folder = LEGACY_FOLDER_NAMES.get(folder, folder)
    dirs, extensions = MODEL_FOLDERS[folder]
    found: set[str] = set()
    for root in (paths.base / rel for rel in dirs):
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if d != ".git"]
            for name in filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                if not extensions or os.path.splitext(rel)[-1].lower() in extensions:
                    found.add(rel)
    return sorted(found)


def full_model_path(paths: Paths, folder: str, name: str) -> Path | None:
    """folder_paths.get_full_path: the first folder holding the file; no escaping the folder."""
    relative = os.path.relpath(os.path.join("/", name), "/")
    for root in paths.folder_dirs(folder):
        candidate = root / relative
        if candidate.is_file():
            return candidate
    return None


def vae_list(paths: Paths) -> list[str]:
    """VAELoader.vae_list: files in vae/, the TAESD pairs found in vae_approx/, then pixel_space."""
    vaes = filename_list(paths, "vae")
    approx = filename_list(paths, "vae_approx")
    for name, prefix in TAESD_NAMES:
        if any(v.startswith(f"{prefix}_encoder.") for v in approx) and any(
            v.startswith(f"{prefix}_decoder.") for v in approx
        ):
            vaes.append(name)
    vaes.append("pixel_space")
    return vaes


def input_images(paths: Paths) -> list[str]:
    """LoadImage's list: image files directly in input/ (ComfyUI does not list subfolders)."""
    if not paths.input.is_dir():
        return []
    files = [p.name for p in paths.input.iterdir() if p.is_file()]
    images = []
    for name in files:
        mime, _ = mimetypes.guess_type(name, strict=False)
        if mime and mime.split("/")[0] == "image":
            images.append(name)
    return sorted(images)


def annotated_filepath(name: str) -> tuple[str, str | None]:
    """folder_paths.annotated_filepath: 'x.png [output]' names another folder than input/."""
    for suffix, kind in (("[output]", "output"), ("[input]", "input"), ("[temp]", "temp")):
        if name.endswith(suffix):
            return name[: -len(suffix) - 1], kind
    return name, None


def annotated_path(paths: Paths, name: str) -> Path:
    stripped, kind = annotated_filepath(name)
    base = paths.directory_by_type(kind) if kind else paths.input
    assert base is not None
    return Path(os.path.join(base, stripped))


def is_link(value: Any) -> bool:
    """comfy_execution.graph_utils.is_link."""
    return (
        isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
        and isinstance(value[1], (int, float)) and not isinstance(value[1], bool)
    )


class _Listing:
    """The live COMBO lists, read once per request."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self._cache: dict[str, list[str]] = {}

    def get(self, source: str) -> list[str]:
        if source not in self._cache:
            if source == "@vae_list":
                self._cache[source] = vae_list(self.paths)
            elif source == "@input_images":
                self._cache[source] = input_images(self.paths)
            else:
                self._cache[source] = filename_list(self.paths, source)
        return list(self._cache[source])


def _combo_source(class_type: str, name: str, spec: Any) -> str | None:
    if not isinstance(spec, list) or not spec:
        return None
    kind = spec[0]
    if not (isinstance(kind, list) or kind == "COMBO"):
        return None
    return MODEL_INPUTS_BY_CLASS.get((class_type, name)) or MODEL_INPUTS_BY_NAME.get(name)


def load_extra_schemas(directory: Path) -> dict[str, dict[str, Any]]:
    extra: dict[str, dict[str, Any]] = {}
    if not directory.is_dir():
        return extra
    for path in sorted(directory.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "input" in data and "output" in data:
            extra[str(data.get("name") or path.stem)] = data
        elif isinstance(data, dict):
            extra.update(data)
        else:
            raise ValueError(f"{path}: expected an object_info entry or a mapping of them")
    return extra


class Schemas:
    """NODE_CLASS_MAPPINGS as the fake knows it: object_info entries, with live COMBO lists."""

    def __init__(self, paths: Paths, extra_dir: Path = EXTRA_SCHEMAS_DIR) -> None:
        self.paths = paths
        self.base: dict[str, dict[str, Any]] = json.loads(OBJECT_INFO_PATH.read_text())
        self.base.update(load_extra_schemas(extra_dir))
        # (class, input) -> list source, for the entries whose lists come from the disk.
        self._live: dict[str, dict[tuple[str, str], str]] = {}
        for class_type, entry in self.base.items():
            for category in ("required", "optional"):
                for name, spec in (entry.get("input", {}).get(category) or {}).items():
                    source = _combo_source(class_type, name, spec)
                    if source:
                        self._live.setdefault(class_type, {})[(category, name)] = source

    def __contains__(self, class_type: object) -> bool:
        return class_type in self.base

    def get(self, class_type: Any) -> dict[str, Any] | None:
        # A dict lookup, so an unhashable class_type raises TypeError as in ComfyUI.
        return self.base.get(class_type, None)

    def is_output(self, class_type: str) -> bool:
        return self.base[class_type].get("output_node") is True

    def is_v3(self, class_type: str) -> bool:
        return "api_node" in self.base[class_type]

    def return_types(self, class_type: str) -> tuple[Any, ...]:
        return tuple(self.base[class_type].get("output", []))

    def output_is_list(self, class_type: str) -> list[bool]:
        return list(self.base[class_type].get("output_is_list", []))

    def hidden(self, class_type: str) -> dict[str, str]:
        raw = self.base[class_type].get("input", {}).get("hidden") or {}
        return {k: (v[0] if isinstance(v, list) else v) for k, v in raw.items()}

    def info(self, class_type: str, listing: _Listing | None = None) -> dict[str, Any]:
        entry = self.base[class_type]
        live = self._live.get(class_type)
        if not live:
            return entry
        listing = listing or _Listing(self.paths)
        entry = copy.deepcopy(entry)
        for (category, name), source in live.items():
            spec = entry["input"][category][name]
            values = listing.get(source)
            if spec[0] == "COMBO":
                spec[1]["options"] = values
            else:
                spec[0] = values
        return entry

    def all_info(self) -> dict[str, dict[str, Any]]:
        listing = _Listing(self.paths)
        return {name: self.info(name, listing) for name in self.base}

    def input_types(self, class_type: str, listing: _Listing | None = None) -> dict[str, Any]:
        return dict(self.info(class_type, listing).get("input", {}))

    def static_input_types(self, class_type: str) -> dict[str, Any]:
        """The input specs without reading the disk (types, not the live COMBO lists)."""
        return dict(self.base[class_type].get("input", {}))


def get_input_info(class_inputs: dict[str, Any], name: str) -> tuple[Any, str | None, dict[str, Any] | None]:
    """comfy_execution.graph.get_input_info: (type, category, extra info)."""
    for category in ("required", "optional", "hidden"):
        section = class_inputs.get(category) or {}
        if name in section:
            spec = section[name]
            if isinstance(spec, str):
                spec = [spec]
            extra = spec[1] if len(spec) > 1 else {}
            return spec[0], category, extra
    return None, None, None


def validate_node_input(received_type: Any, input_type: Any, strict: bool = False) -> bool:
    """comfy_execution.validation.validate_node_input."""
    if not received_type != input_type:  # noqa: SIM202 - ComfyUI's "pre-union behaviour" on purpose
        return True
    if not isinstance(received_type, str) or not isinstance(input_type, str):
        return False
    received = {t.strip() for t in received_type.split(",")}
    accepted = {t.strip() for t in input_type.split(",")}
    if "*" in received or "*" in accepted:
        return True
    if strict:
        return received.issubset(accepted)
    return len(received & accepted) > 0


def full_type_name(klass: type) -> str:
    module = klass.__module__
    if module == "builtins":
        return klass.__qualname__
    return module + "." + klass.__qualname__


def frame(path: str, line: int, func: str, code: str, marked: str | None = None) -> str:
    """One traceback.format_tb entry as CPython 3.11 prints it, with the caret line."""
    text = f'  File "{path}", line {line}, in {func}\n    {code}\n'
    if marked is not None and marked != code:
        start = code.index(marked)
        text += " " * (4 + start) + "^" * len(marked) + "\n"
    return text


def _subscript_frame(line: int, code: str, value: str, subscript: str) -> str:
    start = code.index(value + subscript)
    carets = " " * (4 + start) + "~" * len(value) + "^" * len(subscript)
    return f'  File "/comfyui/execution.py", line {line}, in validate_inputs\n    {code}\n{carets}\n'


# The execution.py lines ComfyUI 0.3.64 names in validation tracebacks. 1010, 808, 788 and 790 are
# recorded; the others are this fake's best estimate.
_CALL_FRAMES = {
    "validate_prompt": frame(
        "/comfyui/execution.py", 1010, "validate_prompt",
        "m = await validate_inputs(prompt_id, prompt, o, validated)",
        "await validate_inputs(prompt_id, prompt, o, validated)",
    ),
    "inner": frame(
        "/comfyui/execution.py", 808, "validate_inputs",
        "r = await validate_inputs(prompt_id, prompt, o_id, validated)",
        "await validate_inputs(prompt_id, prompt, o_id, validated)",
    ),
}
_RAISE_FRAMES = {
    "linked_class": _subscript_frame(788, "o_class_type = prompt[o_id]['class_type']", "prompt", "[o_id]"),
    "linked_class_key": _subscript_frame(
        788, "o_class_type = prompt[o_id]['class_type']", "prompt[o_id]", "['class_type']"
    ),
    "return_type": _subscript_frame(790, "received_type = r[val[1]]", "r", "[val[1]]"),
    "inputs": _subscript_frame(732, "inputs = prompt[unique_id]['inputs']", "prompt[unique_id]", "['inputs']"),
    "custom": frame(
        "/comfyui/execution.py", 882, "validate_inputs",
        "ret = await _async_map_node_over_list(prompt_id, unique_id, obj_class, input_filtered, "
        "validate_function_name, v3_data=v3_data)",
        "await _async_map_node_over_list(prompt_id, unique_id, obj_class, input_filtered, "
        "validate_function_name, v3_data=v3_data)",
    ),
}


def _tag(ex: BaseException, where: str) -> BaseException:
    if not hasattr(ex, "comfy_where"):
        ex.comfy_where = where  # type: ignore[attr-defined]
    return ex


def _traceback(ex: BaseException, caller: str) -> list[str]:
    where = getattr(ex, "comfy_where", None)
    raised = _RAISE_FRAMES.get(where or "")
    if raised is None:
        raised = frame("/comfyui/execution.py", 760, "validate_inputs", f"raise {type(ex).__name__}")
    return [_CALL_FRAMES[caller], raised]


@dataclass(frozen=True)
class CustomValidator:
    """A node's VALIDATE_INPUTS: its argument names and the check (True, or a failure text)."""

    qualname: str
    args: tuple[str, ...]
    check: Callable[..., Any]


def _validate_image_file(paths: Paths, image: Any) -> Any:
    # LoadImage.VALIDATE_INPUTS: folder_paths.exists_annotated_filepath(image)
    if not os.path.exists(annotated_path(paths, image)):
        return f"Invalid image file: {image}"
    return True


CUSTOM_VALIDATORS: dict[str, CustomValidator] = {
    "LoadImage": CustomValidator("LoadImage.VALIDATE_INPUTS", ("s", "image"), _validate_image_file),
    "LoadImageMask": CustomValidator("LoadImageMask.VALIDATE_INPUTS", ("s", "image"), _validate_image_file),
}

ValidateResult = tuple[bool, list[dict[str, Any]], Any]


class _Validator:
    def __init__(self, schemas: Schemas, prompt: Any) -> None:
        self.schemas = schemas
        self.prompt = prompt
        self.listing = _Listing(schemas.paths)
        self.validated: dict[Any, ValidateResult] = {}

    def validate_inputs(self, unique_id: Any) -> ValidateResult:
        if unique_id in self.validated:
            return self.validated[unique_id]
        try:
            inputs = self.prompt[unique_id]["inputs"]
        except Exception as ex:
            raise _tag(ex, "inputs") from None
        class_type = self.prompt[unique_id]["class_type"]
        class_inputs = self.schemas.input_types(class_type, self.listing)
        required, optional = class_inputs.get("required") or {}, class_inputs.get("optional") or {}
        valid_inputs = list(dict.fromkeys([*required, *optional]))

        errors: list[dict[str, Any]] = []
        valid = True
        custom = CUSTOM_VALIDATORS.get(class_type)
        validate_function_inputs = list(custom.args) if custom else []

        for x in valid_inputs:
            input_type, input_category, extra_info = get_input_info(class_inputs, x)
            assert extra_info is not None
            if x not in inputs:
                if input_category == "required":
                    errors.append({
                        "type": "required_input_missing",
                        "message": "Required input is missing",
                        "details": f"{x}",
                        "extra_info": {"input_name": x},
                    })
                continue

            val = inputs[x]
            info = [input_type, extra_info]
            if isinstance(val, list):
                if len(val) != 2:
                    errors.append({
                        "type": "bad_linked_input",
                        "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        "details": f"{x}",
                        "extra_info": {"input_name": x, "input_config": info, "received_value": val},
                    })
                    continue
                o_id = val[0]
                try:
                    linked = self.prompt[o_id]
                except Exception as ex:
                    raise _tag(ex, "linked_class") from None
                try:
                    o_class_type = linked["class_type"]
                except Exception as ex:
                    raise _tag(ex, "linked_class_key") from None
                r = self.schemas.return_types(o_class_type)
                try:
                    received_type = r[val[1]]
                except Exception as ex:
                    raise _tag(ex, "return_type") from None
                if "input_types" not in validate_function_inputs and not validate_node_input(received_type, input_type):
                    errors.append({
                        "type": "return_type_mismatch",
                        "message": "Return type mismatch between linked nodes",
                        "details": f"{x}, received_type({received_type}) mismatch input_type({input_type})",
                        "extra_info": {
                            "input_name": x, "input_config": info, "received_type": received_type, "linked_node": val,
                        },
                    })
                    continue
                try:
                    linked_result = self.validate_inputs(o_id)
                    if linked_result[0] is False:
                        valid = False
                        continue
                except Exception as ex:
                    valid = False
                    self.validated[o_id] = (False, [{
                        "type": "exception_during_inner_validation",
                        "message": "Exception when validating inner node",
                        "details": str(ex),
                        "extra_info": {
                            "input_name": x,
                            "input_config": info,
                            "exception_message": str(ex),
                            "exception_type": full_type_name(type(ex)),
                            "traceback": _traceback(ex, "inner"),
                            "linked_node": val,
                        },
                    }], o_id)
                    continue
            else:
                try:
                    # A list widget value travels wrapped in {"__value__": [...]}.
                    if isinstance(val, dict) and "__value__" in val:
                        val = val["__value__"]
                        inputs[x] = val
                    if input_type == "INT":
                        val = int(val)
                        inputs[x] = val
                    if input_type == "FLOAT":
                        val = float(val)
                        inputs[x] = val
                    if input_type == "STRING":
                        val = str(val)
                        inputs[x] = val
                    if input_type == "BOOLEAN":
                        val = bool(val)
                        inputs[x] = val
                except Exception as ex:
                    errors.append({
                        "type": "invalid_input_type",
                        "message": f"Failed to convert an input value to a {input_type} value",
                        "details": f"{x}, {val}, {ex}",
                        "extra_info": {
                            "input_name": x, "input_config": info, "received_value": val, "exception_message": str(ex),
                        },
                    })
                    continue

                if x not in validate_function_inputs:
                    if "min" in extra_info and val < extra_info["min"]:
                        errors.append({
                            "type": "value_smaller_than_min",
                            "message": "Value {} smaller than min of {}".format(val, extra_info["min"]),
                            "details": f"{x}",
                            "extra_info": {"input_name": x, "input_config": info, "received_value": val},
                        })
                        continue
                    if "max" in extra_info and val > extra_info["max"]:
                        errors.append({
                            "type": "value_bigger_than_max",
                            "message": "Value {} bigger than max of {}".format(val, extra_info["max"]),
                            "details": f"{x}",
                            "extra_info": {"input_name": x, "input_config": info, "received_value": val},
                        })
                        continue
                    if isinstance(input_type, list) or input_type == "COMBO":
                        combo_options = extra_info.get("options", []) if input_type == "COMBO" else input_type
                        if val not in combo_options:
                            input_config: Any = info
                            # ComfyUI leaves long lists (scanned model paths) out of the answer.
                            if len(combo_options) > 20:
                                list_info = f"(list of length {len(combo_options)})"
                                input_config = None
                            else:
                                list_info = str(combo_options)
                            errors.append({
                                "type": "value_not_in_list",
                                "message": "Value not in list",
                                "details": f"{x}: '{val}' not in {list_info}",
                                "extra_info": {"input_name": x, "input_config": input_config, "received_value": val},
                            })
                            continue

        if custom is not None:
            errors.extend(self._custom_validation(custom, inputs, class_type))

        result: ValidateResult = (False, errors, unique_id) if errors or valid is not True else (True, [], unique_id)
        self.validated[unique_id] = result
        return result

    def _custom_validation(self, custom: CustomValidator, inputs: dict[str, Any], class_type: str,
                           ) -> list[dict[str, Any]]:
        class_inputs = self.schemas.input_types(class_type, self.listing)
        filtered: dict[str, Any] = {}
        for name, value in inputs.items():
            category = get_input_info(class_inputs, name)[1]
            if name not in custom.args:
                continue
            if is_link(value):
                filtered[name] = None  # get_input_data marks links missing before execution
            elif category is not None:
                filtered[name] = value
        missing = [a for a in custom.args[1:] if a not in filtered]
        if missing:
            raise _tag(TypeError(
                f"{custom.qualname}() missing {len(missing)} required positional argument"
                f"{'s' if len(missing) > 1 else ''}: {', '.join(repr(m) for m in missing)}"
            ), "custom")
        try:
            ret = custom.check(self.schemas.paths, **filtered)
        except Exception as ex:
            raise _tag(ex, "custom") from None
        errors = []
        for x in filtered:
            if ret is not True:
                details = f"{x}"
                if ret is not False:
                    details += f" - {ret!s}"
                errors.append({
                    "type": "custom_validation_failed",
                    "message": "Custom validation failed for node",
                    "details": details,
                    "extra_info": {"input_name": x},
                })
        return errors


def validate_prompt(
    schemas: Schemas, prompt: Any, partial_execution_list: Iterable[str] | None = None,
) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
    """execution.validate_prompt: (valid, error, outputs to execute, node_errors).

    Exceptions ComfyUI does not catch here (a prompt that is a list, a node that is a number)
    propagate, and the server answers them with aiohttp's plain-text 500, as ComfyUI does.
    """
    partial = list(partial_execution_list) if partial_execution_list is not None else None
    outputs: dict[Any, None] = {}
    for x in prompt:
        if "class_type" not in prompt[x]:
            return (False, {
                "type": "invalid_prompt",
                "message": "Cannot execute because a node is missing the class_type property.",
                "details": f"Node ID '#{x}'",
                "extra_info": {},
            }, [], {})
        class_type = prompt[x]["class_type"]
        if schemas.get(class_type) is None:
            return (False, {
                "type": "invalid_prompt",
                "message": f"Cannot execute because node {class_type} does not exist.",
                "details": f"Node ID '#{x}'",
                "extra_info": {},
            }, [], {})
        if schemas.is_output(class_type) and (partial is None or x in partial):
            outputs[x] = None

    if len(outputs) == 0:
        return (False, {
            "type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {},
        }, [], {})

    validator = _Validator(schemas, prompt)
    good_outputs: list[Any] = []
    failed: list[tuple[Any, list[dict[str, Any]]]] = []
    node_errors: dict[Any, dict[str, Any]] = {}
    for o in outputs:
        try:
            m = validator.validate_inputs(o)
            valid, reasons = m[0], m[1]
        except Exception as ex:
            valid = False
            reasons = [{
                "type": "exception_during_validation",
                "message": "Exception when validating node",
                "details": str(ex),
                "extra_info": {
                    "exception_type": full_type_name(type(ex)), "traceback": _traceback(ex, "validate_prompt"),
                },
            }]
            validator.validated[o] = (False, reasons, o)

        if valid is True:
            good_outputs.append(o)
            continue
        failed.append((o, reasons))
        # As ComfyUI: every node validated so far with errors gets this output appended, whether
        # or not the output depends on it.
        for node_id, result in validator.validated.items():
            if result[0] is not True and len(result[1]) > 0:
                if node_id not in node_errors:
                    node_errors[node_id] = {
                        "errors": result[1],
                        "dependent_outputs": [],
                        "class_type": prompt[node_id]["class_type"],
                    }
                node_errors[node_id]["dependent_outputs"].append(o)

    if len(good_outputs) == 0:
        lines = [f"{e['message']}: {e['details']}" for _, reasons in failed for e in reasons]
        return (False, {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": "\n".join(lines),
            "extra_info": {},
        }, [], node_errors)
    return (True, None, good_outputs, node_errors)
