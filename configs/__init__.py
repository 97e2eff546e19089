"""Shipped TOML configs: the debug CPU run and one per model flavor."""
