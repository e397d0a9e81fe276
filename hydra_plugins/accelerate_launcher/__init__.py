"""hydra/launcher=accelerate (see accelerate_launcher.py). Hydra finds launchers only in hydra_plugins."""
