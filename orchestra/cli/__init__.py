"""Command-line entry points: one module per command, each thin (parse, call, print)."""
