"""Command-line entry points: ``seglstm <command> ...``."""
