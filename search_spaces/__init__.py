"""Built-in search spaces (installed as the package ``nas.spaces``, so they resolve by name)."""
