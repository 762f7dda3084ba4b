"""Prompt sets: a .txt file (one prompt a line, '#' comments), a .jsonl file (one JSON object a line), or a
built-in set shipped with flowfactory (`colours`, `colours-eval`, `red-blue`, `red-blue-eval`).

A .jsonl line is one prompt record (`flowfactory.prompts.Prompt`): `"prompt"` (the text, required), `"image"`
(one input image) or `"images"` (a list, in the order the model takes them), target images `"target"`,
`"chosen"`, `"rejected"` (for dataset algorithms), and any other fields, kept as the record's metadata. Image
paths are relative to the .jsonl file (or absolute); each must be a readable image, checked when the set loads
(so at `ff validate`), with an error naming the file, the line and the path."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from flowfactory.errors import FlowFactoryError
from flowfactory.prompts import INPUT_FIELDS, TARGET_FIELDS, Prompt, check_image


def builtin_sets() -> list[str]:
    return sorted(p.name[:-4] for p in resources.files("flowfactory.data").iterdir() if p.name.endswith(".txt"))


def resolve(spec: str, base_dir: str | Path | None = None) -> Path | str:
    """A prompt file path (relative paths tried against the config's folder, then the working dir), or the
    name of a built-in set."""
    p = Path(spec).expanduser()
    candidates = [p] if p.is_absolute() else ([Path(base_dir) / p] if base_dir else []) + [p]
    for c in candidates:
        if c.is_file():
            return c
    if spec in builtin_sets():
        return spec
    return p


def load_prompts(spec: str, base_dir: str | Path | None = None, key: str = "data.train") -> list[Prompt]:
    """The prompt records of a set, in file order."""
    src = resolve(spec, base_dir)
    if isinstance(src, str):
        text = resources.files("flowfactory.data").joinpath(f"{src}.txt").read_text()
        return [Prompt(t) for t in _parse_txt(text)]
    if not src.is_file():
        raise FlowFactoryError(
            f"{key}: {spec!r} is neither a prompt file nor a built-in set (built-ins: {', '.join(builtin_sets())}). "
            "Give a .txt file with one prompt per line or a .jsonl file with a 'prompt' per line.")
    text = _read_text(src, key)
    prompts = _parse_jsonl(text, src, key) if src.suffix == ".jsonl" else [Prompt(t) for t in _parse_txt(text)]
    if not prompts:
        raise FlowFactoryError(f"{key}: {src} holds no prompts")
    return prompts


def _read_text(path: Path, key: str) -> str:
    """The file as UTF-8 text (a leading byte-order mark is dropped), or one message naming what is wrong."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FlowFactoryError(f"{key}: cannot read {path}: {exc.strerror}; check that the file is readable") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        fixed = path.with_name(f"{path.stem}.utf8{path.suffix}")
        raise FlowFactoryError(
            f"{key}: {path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}, column {column}. Save "
            f"the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path} -o {fixed}`, naming its actual encoding "
            f"after -f) and point {key} at it") from None


def _parse_txt(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _parse_jsonl(text: str, path: Path, key: str) -> list[Prompt]:
    out = []
    for i, ln in enumerate(text.splitlines(), 1):
        if not ln.strip():
            continue
        where = f"{key}: {path}:{i}"
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as exc:
            raise FlowFactoryError(f"{where}: not JSON ({exc}); each line must be one JSON object with a 'prompt'") \
                from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise FlowFactoryError(f"{where}: each line must be a JSON object with a 'prompt' string, e.g. "
                                   '{"prompt": "a red square"} or {"prompt": "make it blue", "image": "src/1.png"}')
        if "image" in obj and "images" in obj:
            raise FlowFactoryError(f"{where}: give either 'image' (one path) or 'images' (a list), not both")
        inputs = obj.get("images", [obj["image"]] if "image" in obj else [])
        if not isinstance(inputs, list) or not all(isinstance(p, str) for p in inputs):
            raise FlowFactoryError(f"{where}: 'images' must be a list of paths (strings), got {inputs!r}")
        for name in TARGET_FIELDS:
            if name in obj and not isinstance(obj[name], str):
                raise FlowFactoryError(f"{where}: {name!r} must be an image path (a string), got {obj[name]!r}")
        images = [_image_path(p, path, where, "image") for p in inputs]
        targets = {name: _image_path(obj[name], path, where, name) for name in TARGET_FIELDS if name in obj}
        metadata = {k: v for k, v in obj.items() if k not in ("prompt", *INPUT_FIELDS, *TARGET_FIELDS)}
        try:
            out.append(Prompt(obj["prompt"], images=images, targets=targets, metadata=metadata))
        except OSError as exc:
            raise FlowFactoryError(f"{where}: cannot read {exc.filename}: {exc.strerror}") from None
    return out


def _image_path(spec: str, data_file: Path, where: str, field: str) -> Path:
    """`spec` resolved against the data file's folder, checked to be a readable image."""
    p = Path(spec).expanduser()
    p = p if p.is_absolute() else data_file.parent / p
    problem = check_image(p)
    if problem is not None:
        raise FlowFactoryError(f"{where}: {field} {spec!r} ({p}): {problem}; paths are relative to {data_file.name}'s "
                               f"folder")
    return p.resolve()
