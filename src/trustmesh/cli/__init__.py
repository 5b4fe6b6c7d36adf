"""Command line: parse arguments, call the library, render. Nothing else."""
