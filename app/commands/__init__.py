"""Subcommands of the gsp command line, one module each."""
