"""`python -m expert_hub.cli` runs the same entry point as the `expert-hub` script."""

from expert_hub.cli.main import main

main()
