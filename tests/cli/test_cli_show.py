"""`ff show KIND NAME` and the options description behind it."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field

import flowfactory
from flowfactory_cli.describe import OptionRow, option_rows, type_name


def test_show_prints_summary_package_and_nested_options(cli) -> None:
    result = cli("show", "policy", "tiny-policy")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "tiny-policy (policy) from test-plugins 1.0"
    assert lines[1] == "A tiny test policy."
    rows = [[c.strip() for c in line.split("│")] for line in lines if "│" in line]
    assert rows == [
        ["preset", '"tiny" | null', "null", "Built-in size preset."],
        ["size", "int, >= 2", "8", "Image side in pixels."],
        ["lora", "LoraOptions | null", "null", "LoRA settings; null: full finetune."],
        ["lora.rank", "int, >= 1", "4", "LoRA rank."],
        ["lora.alpha", "float | null, > 0", "null", "LoRA alpha; null: equal to rank."],
    ]


def test_show_on_an_80_column_terminal_lists_each_option_with_its_whole_description(plugin_state) -> None:
    from typer.testing import CliRunner

    from flowfactory_cli.main import create_app

    result = CliRunner().invoke(create_app(plugin_state, strict=True), ["show", "policy", "tiny-policy"],
                                env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    body = lines[lines.index("options") + 1:]
    assert body == [
        'preset  "tiny" | null  (default null)', "    Built-in size preset.",
        "size  int, >= 2  (default 8)", "    Image side in pixels.",
        "lora  LoraOptions | null  (default null)", "    LoRA settings; null: full finetune.",
        "lora.rank  int, >= 1  (default 4)", "    LoRA rank.",
        "lora.alpha  float | null, > 0  (default null)", "    LoRA alpha; null: equal to rank.",
    ]


def test_show_json(cli) -> None:
    result = cli("show", "optimizer", "fake-opt", "--json")
    assert json.loads(result.stdout) == {
        "kind": "optimizer", "name": "fake-opt", "package": "test-plugins", "version": "1.0",
        "summary": "A test optimizer.",
        "options": [{"name": "clip_range", "type": "float, > 0", "default": "0.2", "description": "Ratio clip.",
                     "required": False}],
    }


def test_show_builtin_without_options(cli) -> None:
    result = cli("show", "rewards", "brightness")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        f"brightness (reward) from flowfactory {flowfactory.__version__}",
        "Mean luma of the image in [0, 1].",
        "",
        "No options.",
    ]


def test_show_unknown_name_suggests_the_closest(cli, user_error) -> None:
    result = cli("show", "sampler", "flow-sd")
    user_error(result, "no sampler named 'flow-sd' is installed. Did you mean 'flow-sde'?",
               "`ff list sampler` shows them")


def test_show_unknown_kind(cli, user_error) -> None:
    user_error(cli("show", "scheduler", "ode"), "unknown component kind 'scheduler'; kinds are policy, sampler, "
                                                "reward, optimizer.")


def test_show_missing_name_is_a_usage_error(cli) -> None:
    result = cli("show", "reward")
    assert result.exit_code == 2
    assert "Missing argument 'NAME'" in result.stderr


class Inner(BaseModel):
    depth: int = 1


class Outer(BaseModel):
    required_path: str = Field(description="Must be given.")
    mode: Literal["a", "b"] = "a"
    betas: tuple[float, float] = (0.9, 0.999)
    ratios: list[float] = Field(default_factory=lambda: [0.5, 2.0], min_length=1)
    table: dict[str, Any] = Field(default_factory=dict)
    inner: Inner = Field(default_factory=Inner)
    many: list[Inner] = Field(default_factory=list)
    mapped: dict[str, Inner] | None = None
    child: Outer | None = None


def test_option_rows_cover_types_defaults_and_nesting() -> None:
    rows = option_rows(Outer)
    assert [(r.name, r.type, r.default, r.required) for r in rows] == [
        ("required_path", "str", "required", True),
        ("mode", '"a" | "b"', '"a"', False),
        ("betas", "tuple[float, float]", "[0.9, 0.999]", False),
        ("ratios", "list[float], min length 1", "[0.5, 2.0]", False),
        ("table", "dict[str, any]", "{}", False),
        ("inner", "Inner", '{"depth": 1}', False),
        ("inner.depth", "int", "1", False),
        ("many", "list[Inner]", "[]", False),
        ("many[].depth", "int", "1", False),
        ("mapped", "dict[str, Inner] | null", "null", False),
        ("mapped.<key>.depth", "int", "1", False),
        ("child", "Outer | null", "null", False),  # self-reference: not expanded again
    ]
    assert rows[0] == OptionRow("required_path", "str", "required", "Must be given.", True)


def test_type_name() -> None:
    assert type_name(int | None) == "int | null"
    assert type_name(tuple[int, ...]) == "tuple[int, ...]"
    assert type_name(Literal[1, 2]) == "1 | 2"
    assert type_name(Any) == "any"
