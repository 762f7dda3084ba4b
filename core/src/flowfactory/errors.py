"""Errors a user can act on. The CLI prints them as one message, never a traceback."""

from __future__ import annotations


class FlowFactoryError(Exception):
    """Base class of user-facing errors: the message names the problem and the fix."""


class PluginError(FlowFactoryError):
    """A plugin failed to load, registered a duplicate, or implemented an unknown hook."""


class UnknownComponentError(FlowFactoryError):
    """A config names a component that no installed package provides."""


class ConfigError(FlowFactoryError):
    """One or more problems in a run config; every problem is listed with its location."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        n = len(problems)
        lines = [f"{source}: {n} problem{'s' if n != 1 else ''}"]
        lines += [f"  {loc}: {msg}" if loc else f"  {msg}" for loc, msg in problems]
        super().__init__("\n".join(lines))


class RewardError(FlowFactoryError):
    """A reward returned something unusable (wrong shape, NaN) or raised; the step is skipped."""
