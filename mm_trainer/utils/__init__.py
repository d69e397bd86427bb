"""Small helpers every layer may use: crash-safe writes, JSON-ready values, number formatting, input checks."""
