"""Training: the flow-matching loss, ``train()``, EMA, checkpoints, distributed data parallel."""
from .checkpoint import (Checkpoint, load_checkpoint, load_extra, load_state, load_weights, read_config,
                         remove_stale, resolve_checkpoint, save_checkpoint)
from .ema import EMA
from .loop import TrainResult, resolve_device, train
from .loss import (TIME_SAMPLERS, LogitNormalTime, UniformTime, flow_matching_loss, get_time_sampler, lr_factor)

__all__ = ["Checkpoint", "load_checkpoint", "load_extra", "load_state", "load_weights", "read_config",
           "remove_stale", "resolve_checkpoint", "save_checkpoint", "EMA", "TrainResult", "resolve_device", "train",
           "TIME_SAMPLERS", "LogitNormalTime", "UniformTime", "flow_matching_loss", "get_time_sampler", "lr_factor"]
