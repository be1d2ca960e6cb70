"""vmvault.cli: the `vmvault` command (Typer + Rich); entry point vmvault.cli.main:main."""
