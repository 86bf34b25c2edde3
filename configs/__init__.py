"""The packaged device configs: one TOML file per device, read with importlib.resources."""
