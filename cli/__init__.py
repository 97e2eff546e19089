"""The ``stalwart`` command line: one module per subcommand, defined through :mod:`stalwart.cli.command`."""
