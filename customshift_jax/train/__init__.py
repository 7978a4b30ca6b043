"""LoRA training of CustomShift's two branches (DESIGN section 4, "Training"): a pure jit-able step,
the optimizer, a deterministic data pipeline over prepared latent shards, and the `customshift train` loop."""
from customshift_jax.train.optim import make_lr_schedule, make_optimizer
from customshift_jax.train.step import TrainState, init_train_state, make_train_step, rectified_flow_loss, step_key

__all__ = ["TrainState", "init_train_state", "make_train_step", "rectified_flow_loss", "step_key",
           "make_lr_schedule", "make_optimizer"]
