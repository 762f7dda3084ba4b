"""Public test helpers for plugin authors: contract suites and tiny builders."""
