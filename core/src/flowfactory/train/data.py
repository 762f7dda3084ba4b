"""Prompt sets: a .txt file (one prompt a line, '#' comments), a .jsonl file ({"prompt": ...} per line), or
a built-in set shipped with flowfactory (`colours`, `colours-eval`, `red-blue`, `red-blue-eval`)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from flowfactory.errors import FlowFactoryError


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


def load_prompts(spec: str, base_dir: str | Path | None = None, key: str = "data.train") -> list[str]:
    src = resolve(spec, base_dir)
    if isinstance(src, str):
        text = resources.files("flowfactory.data").joinpath(f"{src}.txt").read_text()
        return _parse_txt(text)
    if not src.is_file():
        raise FlowFactoryError(
            f"{key}: {spec!r} is neither a prompt file nor a built-in set (built-ins: {', '.join(builtin_sets())}). "
            "Give a .txt file with one prompt per line or a .jsonl file with a 'prompt' per line.")
    text = _read_text(src, key)
    prompts = _parse_jsonl(text, src, key) if src.suffix == ".jsonl" else _parse_txt(text)
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


def _parse_jsonl(text: str, path: Path, key: str) -> list[str]:
    out = []
    for i, ln in enumerate(text.splitlines(), 1):
        if not ln.strip():
            continue
        try:
            obj = json.loads(ln)
            out.append(str(obj["prompt"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FlowFactoryError(f"{key}: {path}:{i}: each line must be a JSON object with a 'prompt' ({exc})") from exc
    return out
