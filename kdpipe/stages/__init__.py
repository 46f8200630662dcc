"""The work itself, one module per stage; the CLI only parses and calls these."""
