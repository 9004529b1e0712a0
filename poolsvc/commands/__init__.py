"""One module per ``poolsvc`` subcommand (see poolsvc/cli.py)."""
