"""Frozen option dataclasses for the engine. Field names double as the launch flag names."""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
NONFINITE_POLICIES = ("skip", "raise")
OPTIMIZERS = ("adamw", "lamb")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the step runs."""
    strategy: str = "default"
    tpu: str = ""                      # TPU name or address, for strategy="tpu"
    num_gpus: int = 0                  # for "mirrored": 0 means all visible devices
    precision: str = "float32"         # "auto": bf16 on TPU and Ampere+ GPUs, fp16 on older GPUs, CPU: bf16 if native
    jit_compile: bool = False          # XLA for the forward/backward/accumulation function
    # The model's Dropout/Activation layers as small XLA kernels (engine/fusion.py): True, False, or "auto" (on for
    # the CPU, where it is measured faster; off on GPU/TPU, where XLA and cuDNN fuse anyway).
    fuse_elementwise: Union[bool, str] = "auto"
    peak_tflops: float = 0.0           # MFU's peak per GPU/TPU device (or per host CPU); 0: datasheet table / measured
    seed: int = 0
    collective_timeout_secs: float = 0  # multi_worker_mirrored: fail a collective a peer never joins; 0: no limit

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision={self.precision!r}: expected one of {PRECISIONS}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy={self.strategy!r}: expected one of {STRATEGIES}")
        if self.fuse_elementwise not in (True, False, "auto"):
            raise ValueError(f"--fuse_elementwise={self.fuse_elementwise!r}: expected true, false or auto")
        if self.peak_tflops < 0:
            raise ValueError(f"--peak_tflops={self.peak_tflops}: must be >= 0 (0: the built-in table)")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (or LAMB) with linear warmup then linear decay, as in BERT fine-tuning."""
    optimizer: str = "adamw"           # "adamw" | "lamb" (layer-wise trust ratio, for large global batches)
    learning_rate: float = 5e-5
    warmup_steps: int = 0
    decay_steps: Optional[int] = None  # None: decay to end_learning_rate over the whole run
    end_learning_rate: float = 0.0
    weight_decay: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-6
    clip_norm: Optional[float] = 1.0   # by global norm, after averaging over micro-batches and replicas
    # Exponential moving average of the weights (engine/averaging.py), used for evaluation and checkpoints;
    # None: off. 0.999 averages over roughly the last 1,000 updates.
    ema_decay: Optional[float] = None
    # Regexes of variable names that get no weight decay (LayerNorm scales/offsets and biases, as in BERT).
    exclude_from_weight_decay: tuple = ("layer_norm", "LayerNorm", "bias")
    # Layer-wise learning-rate decay: encoder layer l of L (0-based) learns at decay^(L - l) times the rate, the
    # embeddings at decay^(L + 1), everything else (head, pooler) at 1. None: off. Layers and embeddings are
    # found by these regexes on variable names (defaults: Model Garden's BertEncoderV2; group 1 = layer index).
    layer_decay: Optional[float] = None
    layer_pattern: str = r"transformer/layer_(\d+)/"
    embedding_pattern: str = r"(word_embeddings|position_embedding|type_embeddings|embeddings/layer_norm)/"

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer={self.optimizer!r}: expected one of {OPTIMIZERS}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"--layer_decay={self.layer_decay}: expected a value in (0, 1], e.g. 0.9")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate={self.learning_rate}: must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup_steps={self.warmup_steps}: must be >= 0")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay={self.ema_decay}: expected a value in (0, 1), e.g. 0.999")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """The loop: batch geometry, length, evaluation, checkpoints."""
    model_dir: str
    train_steps: int
    global_batch_size: int = 32        # examples per optimizer update, over all replicas and micro-batches
    grad_accum_steps: int = 1          # micro-batches per update
    steps_per_loop: int = 100          # updates per host round-trip (one tf.function call)
    eval_every_steps: int = 0          # 0: evaluate only at the end
    eval_batch_size: int = 64
    eval_split: str = "validation"    # "" for no evaluation during training
    checkpoint_every_steps: int = 0    # 0: at every eval and at the end
    checkpoint_every_secs: float = 600  # also save when this long has passed since the last save; 0: off
    max_to_keep: int = 3
    best_metric: str = ""              # e.g. "accuracy"; "" disables best-checkpoint tracking
    best_metric_mode: str = "max"
    early_stopping_patience: int = 0   # evaluations without improvement of best_metric; 0: never stop early
    nonfinite_policy: str = "skip"     # "skip": skip the update and count it; "raise": stop naming the step
    profile_steps: tuple = ()          # (first, last) step of a profiler trace, from 1 (model_dir/train); () for none

    def __post_init__(self):
        positive = ("train_steps", "global_batch_size", "grad_accum_steps", "steps_per_loop", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)}: must be >= 1")
        if self.global_batch_size % self.grad_accum_steps:
            raise ValueError(
                f"--global_batch_size={self.global_batch_size} is not divisible by "
                f"--grad_accum_steps={self.grad_accum_steps}")
        if self.nonfinite_policy not in NONFINITE_POLICIES:
            raise ValueError(f"--nonfinite_policy={self.nonfinite_policy!r}: expected one of {NONFINITE_POLICIES}")
        if self.best_metric_mode not in ("max", "min"):
            raise ValueError(f"--best_metric_mode={self.best_metric_mode!r}: expected 'max' or 'min'")
        if self.early_stopping_patience and not self.best_metric:
            raise ValueError("--early_stopping_patience needs --best_metric")
        steps = self.profile_steps
        if steps and not (len(steps) == 2 and 1 <= steps[0] <= steps[1]):
            raise ValueError(f"--profile_steps={','.join(map(str, steps))}: expected START,END with "
                             "1 <= START <= END (steps count from 1), e.g. 10,15")

    def per_replica_batch_size(self, num_replicas: int) -> int:
        """Examples one replica sees per micro-batch; checks the geometry divides evenly."""
        divisor = num_replicas * self.grad_accum_steps
        if self.global_batch_size % divisor:
            raise ValueError(
                f"--global_batch_size={self.global_batch_size} must be divisible by replicas ({num_replicas}) "
                f"x --grad_accum_steps={self.grad_accum_steps} = {divisor}")
        if self.eval_batch_size % num_replicas:
            raise ValueError(
                f"--eval_batch_size={self.eval_batch_size} must be divisible by replicas ({num_replicas})")
        return self.global_batch_size // divisor
