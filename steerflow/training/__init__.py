"""Training: the flow-matching loss, ``train()``, EMA, checkpoints, distributed data parallel."""
from .checkpoint import (Checkpoint, load_checkpoint, load_extra, load_state, load_weights, read_config,
                         remove_stale, resolve_checkpoint, save_checkpoint)
from .ema import EMA
from .callbacks import Callback, TensorBoardLogger
from .loop import AbstractRunStore, RunDirectory, TrainConfig, TrainResult, resolve_device, train
from .loss import (TIME_SAMPLERS, AbstractTrainingLoss, FlowMatchingLoss, LogitNormalTime, UniformTime,
                   flow_matching_loss, get_time_sampler, lr_factor)
from .pairs import Batch, as_sampler
from .run import LoadedRun, RunInfo, load_run

__all__ = ["Checkpoint", "load_checkpoint", "load_extra", "load_state", "load_weights", "read_config",
           "remove_stale", "resolve_checkpoint", "save_checkpoint", "EMA", "TrainResult", "resolve_device", "train",
           "TIME_SAMPLERS", "LogitNormalTime", "UniformTime", "flow_matching_loss", "get_time_sampler", "lr_factor",
           "Callback", "TensorBoardLogger", "TrainConfig", "AbstractTrainingLoss", "FlowMatchingLoss", "Batch",
           "as_sampler", "RunInfo", "LoadedRun", "load_run"]
