"""Where each model runs: placement profiles (TOML), hardware detection and tuning (measured
costs for the goodput controller)."""
