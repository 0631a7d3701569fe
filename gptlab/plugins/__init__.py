"""Built-in plugins. Each subpackage is registered through the ``gptlab`` entry-point group,
exactly as a third-party plugin would be (see ``pyproject.toml``)."""
