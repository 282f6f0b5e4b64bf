"""AI coding agents as data: the registry, what is installed and signed in, npm installs."""
