"""The trainer: losses (pure tensor functions), support heads, data, train loop, weight sync, checkpoints."""
