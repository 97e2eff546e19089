"""CLI, config, trainer loop, events, goodput accounting and fault injection."""
