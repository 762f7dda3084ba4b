"""The `ff` command line of flowfactory: list components, inspect plugins, validate and run configs.

Importing this package is cheap (no torch): heavy modules are imported inside the commands that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
