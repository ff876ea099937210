"""Built-in placement profiles (TOML data files), read by edgespec.placement."""
