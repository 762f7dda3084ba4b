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
    """A reward returned something unusable (wrong shape or dtype, NaN) or raised. The run stops before any
    weight changes that epoch; the last complete epoch is checkpointed and `ff run CONFIG --resume` continues."""


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on a signal (Ctrl-C's SIGINT, or SIGTERM from a scheduler) after saving what was
    consistent; `exit_code` is what a shell reports for that signal (130, 143)."""

    def __init__(self, signal_name: str, exit_code: int):
        super().__init__(f"stopped on {signal_name}")
        self.signal_name = signal_name
        self.exit_code = exit_code


class NonFiniteError(FlowFactoryError):
    """A loss or gradient went NaN or infinite; the step was not applied to the weights."""


class AmbiguousComponentError(UnknownComponentError):
    """A config names a component that two installed packages register: it cannot say which it means."""
