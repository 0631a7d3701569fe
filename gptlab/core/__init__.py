"""The framework's core: interfaces, hookspecs, plugin loading, configs, data batching and training."""
