"""flowfactory: reinforcement learning for flow-matching image and video models.

The top-level package imports nothing heavy (no torch), so `ff --help` and `ff list` stay fast.
"""

from flowfactory.hookspecs import Register, hookimpl

__version__ = "0.1.0"

__all__ = ["Register", "hookimpl", "__version__"]
