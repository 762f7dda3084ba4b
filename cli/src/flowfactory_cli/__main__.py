"""`python -m flowfactory_cli` runs `ff`."""

from flowfactory_cli.main import main

main()
