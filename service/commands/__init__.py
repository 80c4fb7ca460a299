"""CLI sub-commands (one module each, see service/cli.py)."""
