"""The parameter table is the one source: the README's table is generated from it, and
`cleanroom purify` has a flag for every entry."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

from defense_core.jobs.params import AUGMENT_FIELDS, PARAM_NAMES, PARAMS, PurifyConfig

ROOT = Path(__file__).resolve().parents[2]


def _script():
    path = ROOT / "scripts" / "params_table.py"
    spec = importlib.util.spec_from_file_location("params_table", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_parameter_table_is_up_to_date() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert _script().rewrite(readme) == readme, "run: python scripts/params_table.py"


def test_the_table_has_one_row_per_parameter() -> None:
    rows = _script().render().splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == [p.name for p in PARAMS]


def test_cleanroom_purify_has_a_flag_for_every_parameter() -> None:
    from cli.purify import purify_command

    flags = set(inspect.signature(purify_command).parameters)
    wanted = {p.name for p in PARAMS if p.kind != "augment"} | {f.name for f in AUGMENT_FIELDS}
    assert wanted <= flags


def test_the_table_defaults_are_the_config_defaults() -> None:
    defaults = {p.name: p.default for p in PARAMS}
    params = PurifyConfig.from_params({}).to_params()
    assert {k: v for k, v in params.items() if k != "stop_acc"} == {
        k: v for k, v in defaults.items() if k != "stop_acc"}
    assert set(PARAM_NAMES) == set(defaults) | {"r"}
