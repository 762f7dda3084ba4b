"""The package around the rewards: a light entry point, documented options, a README whose tables and configs
match the options models, and the command line listing and showing the rewards."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

import flowfactory_rewards_clip as pkg

README = Path(__file__).resolve().parents[3] / "plugins" / "flowfactory-rewards-clip" / "README.md"
MODELS = {"pickscore": pkg.PickScoreOptions, "pickscore-rank": pkg.PickScoreRankOptions,
          "clip-score": pkg.ClipScoreOptions, "aesthetic": pkg.AestheticOptions, "hpsv2": pkg.HPSv2Options}


def test_entry_point_imports_no_torch_and_lists_fast() -> None:
    code = ("import sys, flowfactory_rewards_clip\n"
            "print(','.join(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    listed = subprocess.run([sys.executable, "-m", "flowfactory_cli", "list", "reward"], capture_output=True,
                            text=True, check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    for name in MODELS:
        assert re.search(rf"\b{re.escape(name)}\s.*flowfactory-rewards-clip", listed), name


def test_ff_show_documents_every_option() -> None:
    shown = subprocess.run([sys.executable, "-m", "flowfactory_cli", "show", "reward", "pickscore"],
                           capture_output=True, text=True, check=True).stdout
    for name, field in pkg.PickScoreOptions.model_fields.items():
        assert re.search(rf"^{name}\s", shown, flags=re.M), name
        assert field.description.split(":")[0] in " ".join(shown.split()), name
    for model in MODELS.values():
        assert [n for n, f in model.model_fields.items() if not f.description] == []


def test_readme_tables_list_every_option_and_its_configs_validate() -> None:
    text = README.read_text()
    tables = re.findall(r"^`([\w, `-]+)`(?: and `[\w-]+`)?:\n\n((?:\|.*\n)+)", text, flags=re.M)
    documented: dict[str, set[str]] = {}
    for heading, table in tables:
        keys = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
        for name in re.findall(r"[\w-]+", heading):
            documented[name] = keys
    documented["pickscore-rank"] = documented["pickscore"]
    assert {n: documented.get(n) for n in MODELS} == {n: set(m.model_fields) for n, m in MODELS.items()}
    seen = set()
    for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S):
        for entry in yaml.safe_load(block)["rewards"]:
            MODELS[entry["name"]].model_validate(entry.get("options", {}))
            seen.add(entry["name"])
    assert seen == set(MODELS)


def test_relative_weight_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    from flowfactory.config import resolve_paths

    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "hps.pt").write_bytes(b"")
    options, problems = resolve_paths(pkg.HPSv2Options(checkpoint="weights/hps.pt"), tmp_path, "rewards[0].options")
    assert problems == [] and options.checkpoint == str(tmp_path / "weights" / "hps.pt")
    _, problems = resolve_paths(pkg.AestheticOptions(weights="weights/sac+logos.pth"), tmp_path, "rewards[0].options")
    assert [loc for loc, _ in problems] == ["rewards[0].options.weights"]
