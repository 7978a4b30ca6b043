"""The PyTorch reference of the CustomShift branches; it lives in `customshift_jax.reference.torch_customshift`."""
from customshift_jax.reference.torch_customshift import *  # noqa: F401,F403
from customshift_jax.reference.torch_customshift import TorchCustomShift  # noqa: F401
