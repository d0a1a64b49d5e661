"""The `expert-hub` command line: thin Typer commands over the `expert_hub` library."""
