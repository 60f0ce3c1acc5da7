"""Sub-command groups of the `tandem` CLI, one `typer.Typer` per area."""
