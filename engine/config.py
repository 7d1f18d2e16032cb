"""Frozen option dataclasses for the engine. Each field that is a launch flag says so, with its help text
(engine/options.py); launch/config_flags.py turns them into the flags of launch.train and launch.evaluate."""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

from engine.options import option

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
NONFINITE_POLICIES = ("skip", "raise")
OPTIMIZERS = ("adamw", "lamb")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the step runs."""
    strategy: str = option("default", "tf.distribute strategy.", choices=STRATEGIES)
    tpu: str = option("", "TPU name or address for --strategy=tpu.")
    num_gpus: int = option(0, "GPUs for --strategy=mirrored (0: all).")
    precision: str = option(
        "float32", "auto: mixed_bfloat16 on TPU and on Ampere+ GPUs, mixed_float16 on older GPUs, on the CPU bf16 "
        "only where it is native (else float32).", choices=PRECISIONS, launch_default="auto")
    jit_compile: bool = option(False, "XLA-compile the forward/backward step (measure: helps on some CPUs).")
    fuse_elementwise: Union[bool, str] = option(
        "auto", "Run the model's layers as fused CPU kernels (engine/fusion.py): Dropout and Activation as small XLA "
        "kernels, dense layers as oneDNN MatMul+BiasAdd(+GELU), attention as batched MatMuls, LayerNorm in fewer "
        "ops (a closed-form gradient in training); the same values up to float rounding. auto: on for the CPU, "
        "where it is measured faster; off on GPU/TPU, where XLA and cuDNN fuse anyway.", kind="bool_or_auto")
    skip_padding_in_training: bool = option(
        False, "Train the Transformer blocks' projections, FFN and LayerNorms on the real tokens only, not on padding "
        "(engine/fusion.py, one of --fuse_elementwise's rewrites; attention keeps the padded layout). The token "
        "count varies per batch, so not with --jit_compile or on a TPU, which compile static shapes.")
    peak_tflops: float = option(
        0.0, "MFU: peak dense TFLOP/s of one GPU or TPU device (or of one host's CPU) for the run's precision (0: a "
        "built-in table of A100/H100/V100/T4 and TPU v2-v6e, or the CPU's measured matmul peak; unknown devices "
        "report no MFU).")
    seed: int = option(0, "Initialisation and shuffling seed.")
    collective_timeout_secs: float = option(
        0.0, "--strategy=multi_worker_mirrored: fail a collective that a worker never joins after this long (a "
        "crashed worker is detected within seconds anyway; 0: no limit).")

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision={self.precision!r}: expected one of {PRECISIONS}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy={self.strategy!r}: expected one of {STRATEGIES}")
        if self.fuse_elementwise not in (True, False, "auto"):
            raise ValueError(f"--fuse_elementwise={self.fuse_elementwise!r}: expected true, false or auto")
        if self.skip_padding_in_training and (self.jit_compile or self.strategy == "tpu"):
            raise ValueError("--skip_padding_in_training: the token count varies per batch, which XLA's static shapes "
                             "cannot take; drop it, or --jit_compile and --strategy=tpu")
        if self.peak_tflops < 0:
            raise ValueError(f"--peak_tflops={self.peak_tflops}: must be >= 0 (0: the built-in table)")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (or LAMB) with linear warmup then linear decay, as in BERT fine-tuning."""
    optimizer: str = option("adamw", "adamw, or lamb for large global batches (a per-layer trust ratio "
                            "||w|| / ||update||; same weight-decay exclusions).", choices=OPTIMIZERS)
    learning_rate: float = option(5e-5, "Peak learning rate.")
    warmup_steps: int = option(0, "Linear warmup updates (default 10% of train_steps).", launch_default=None)
    decay_steps: Optional[int] = option(None, "Updates of the linear decay (None: the whole run).", flag=False)
    end_learning_rate: float = option(0.0, "Learning rate at the end of the decay.", flag=False)
    weight_decay: float = option(0.01, "AdamW/LAMB decoupled weight decay (not on LayerNorm and biases).")
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-6
    epsilon_after_bias_correction: bool = option(
        False, "AdamW adds --epsilon to sqrt(v) after the bias correction, as PyTorch's AdamW (and so Hugging Face "
        "recipes) do: the same updates as such a recipe. Default: before it, as tf_keras and Model Garden do (an "
        "effective epsilon of epsilon / sqrt(1 - beta_2^t): 32x larger at the first update, 1.3x at the 1000th).")
    # By global norm, after averaging over micro-batches and replicas; None (or 0) is off.
    clip_norm: Optional[float] = option(1.0, "Clip the global gradient norm (0: off).")
    ema_decay: Optional[float] = option(
        None, "Keep an exponential moving average of the weights with this decay (e.g. 0.999, roughly the last "
        "1,000 updates) and evaluate, checkpoint and export it instead of the last weights (engine/averaging.py).")
    # Regexes of variable names that get no weight decay (LayerNorm scales/offsets and biases, as in BERT).
    exclude_from_weight_decay: tuple = ("layer_norm", "LayerNorm", "bias")
    layer_decay: Optional[float] = option(
        None, "Layer-wise learning-rate decay, e.g. 0.9: encoder layer l of L learns at decay^(L - l) times "
        "--learning_rate, the embeddings at decay^(L + 1), the head at 1 (default off).")
    # Layers and embeddings are found by these regexes on variable names (defaults: Model Garden's BertEncoderV2;
    # group 1 = layer index).
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
    model_dir: str = option(text="Checkpoints and TensorBoard logs; an existing run resumes.", flag=False)
    train_steps: int = option(
        text="Optimizer updates (or use --train_epochs). launch.evaluate --mode=continuous_eval: the final step, "
        "stop after evaluating its checkpoint (default: as launch.train saved it in model_dir/train_steps.json).",
        launch_default=None)
    global_batch_size: int = option(32, "Examples per optimizer update over replicas and micro-batches.")
    grad_accum_steps: int = option(1, "Micro-batches accumulated per update.")
    steps_per_loop: int = option(100, "Updates per compiled loop call (one log line each).", launch_default=50)
    eval_every_steps: int = option(0, "0: evaluate at the end only.")
    eval_batch_size: int = option(64, "Evaluation batch (padded, exact).")
    eval_split: str = option("validation", "Split evaluated during training; '' for none.", flag=False)
    checkpoint_every_steps: int = option(
        0, "Also save every this many steps (0: at every evaluation, the end, and by --checkpoint_every_secs).")
    checkpoint_every_secs: float = option(
        600.0, "Also save when this long has passed since the last save, so a hard kill loses at most that much "
        "(0: off).")
    max_to_keep: int = option(3, "Latest checkpoints kept.")
    best_metric: str = option(
        "", "Keep the best checkpoint by this eval metric (e.g. accuracy) in model_dir/best ('': none; "
        "launch.evaluate --mode=continuous_eval with another --eval_name: model_dir/best_<eval_name>).")
    best_metric_mode: str = option("max", "Whether larger --best_metric is better.", choices=("max", "min"))
    early_stopping_patience: int = option(0, "Stop after this many evaluations without improvement (0: never).")
    nonfinite_policy: str = option("skip", "Non-finite loss/gradients: skip the update and count it, or raise "
                                   "(stop, naming the step).", choices=NONFINITE_POLICIES)
    profile_steps: tuple = option(
        (), "START,END: a profiler trace of steps START to END (from 1) into model_dir/train/plugins/profile, for "
        "TensorBoard's Profile tab (tensorboard-plugin-profile).", item=int, launch_default=None)

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
