"""Old import path of `customshift_jax.train.sharded` (README showed it)."""
from customshift_jax.train.sharded import *  # noqa: F401,F403
from customshift_jax.train.sharded import make_sharded_base_train_step, make_sharded_train_step  # noqa: F401
