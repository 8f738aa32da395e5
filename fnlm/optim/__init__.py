"""Optax-style functional optimizers: :class:`GradientTransformation` pairs of pure functions,
composed with :func:`chain`, and learning-rate schedules (pure tensor functions of the step).
See ``_transforms.py`` for the conventions that let a whole step compile and ``vmap``."""
from fnlm.optim._flatten import FlattenState, decay_groups, flatten
from fnlm.optim._inject import InjectHyperparamsState, find_hyperparam, inject_hyperparams
from fnlm.optim._loss_scale import LossScaleState, dynamic_loss_scale, find_loss_scale
from fnlm.optim._partition import MultiTransformState, masked, multi_transform, set_to_zero
from fnlm.optim._schedules import (ScalarOrSchedule, Schedule, constant, cosine, linear_warmup_constant,
                                   linear_warmup_linear_decay)
from fnlm.optim._transforms import (
    AdamState,
    EmptyState,
    GradientTransformation,
    RmspropState,
    ScaleByScheduleState,
    SgdState,
    adam,
    adamw,
    add_decayed_weights,
    add_l1,
    apply_updates,
    chain,
    clip_by_global_norm,
    default_decay_mask,
    global_norm,
    identity,
    scale,
    rmsprop,
    scale_by_schedule,
    sgd,
)

__all__ = [
    "AdamState", "EmptyState", "FlattenState", "decay_groups", "flatten", "GradientTransformation", "InjectHyperparamsState", "ScalarOrSchedule", "ScaleByScheduleState", "Schedule",
    "SgdState", "adam", "adamw", "add_decayed_weights", "apply_updates", "chain", "clip_by_global_norm",
    "LossScaleState", "dynamic_loss_scale", "find_loss_scale", "constant", "cosine", "default_decay_mask", "find_hyperparam", "global_norm", "identity", "inject_hyperparams", "linear_warmup_constant", "linear_warmup_linear_decay", "masked", "multi_transform", "MultiTransformState", "scale",
    "scale_by_schedule", "set_to_zero", "sgd",
    "RmspropState", "add_l1", "rmsprop",
]
