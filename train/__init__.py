"""The training entry points of the repository: `train/configs/` (the YAML configs) and old import paths.
The training code lives in `customshift_jax.train` (run it with `customshift train`)."""
from customshift_jax.train import *  # noqa: F401,F403
from customshift_jax.train import __all__  # noqa: F401
