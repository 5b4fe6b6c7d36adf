"""``python -m trustmesh`` runs the command line."""

from trustmesh.cli.main import run

run()
