"""`ff validate` on the SDE samplers' `ode_solver` (MixGRPO-Flash): a value it does not know, or the option without
an SDE window to follow, is a config error that names the key."""

from __future__ import annotations


def test_validate_accepts_dpm_solver_after_a_window(cli, config_file) -> None:
    path = config_file(sampler={"name": "flow-sde", "options": {"steps": 8, "sde_window_size": 2,
                                                                "ode_solver": "dpm-solver++2m"}})
    result = cli("validate", str(path))
    assert result.exit_code == 0, result.output


def test_validate_refuses_an_unknown_ode_solver(cli, config_file, user_error) -> None:
    path = config_file(sampler={"name": "flow-sde", "options": {"steps": 8, "sde_window_size": 2,
                                                                "ode_solver": "rk4"}})
    user_error(cli("validate", str(path)), f"{path}: 1 problem",
               "sampler.options.ode_solver: Input should be 'euler' or 'dpm-solver++2m'")


def test_validate_refuses_dpm_solver_without_a_window(cli, config_file, user_error) -> None:
    path = config_file(sampler={"name": "dance-sde", "options": {"steps": 8, "ode_solver": "dpm-solver++2m"}})
    user_error(cli("validate", str(path)), f"{path}: 1 problem", "sampler.options",
               "ode_solver=dpm-solver++2m integrates the steps after the SDE window and needs sde_window_size")
