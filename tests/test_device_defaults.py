"""Device-aware defaults with the device lookup mocked: --precision=auto, --fuse_elementwise=auto, and MFU's
peak FLOP/s (datasheet table for GPUs and TPUs, --peak_tflops, the CPU's measured peak, none when unknown)."""
import os
import subprocess
import sys
from unittest import mock

import pytest
import tensorflow as tf

from conftest import REPO_ROOT
import engine
from engine import fusion, precision
from engine.config import RuntimeConfig
from engine_helpers import ToyTask, run_training


def fake_devices(kind=None, capabilities=(), name="NVIDIA A100-SXM4-40GB"):
    """Patches TF's device lists: `kind` ("GPU"/"TPU") devices beside the CPU, with these compute capabilities."""
    def logical(device_type=None):
        if kind and device_type == kind:
            return [mock.Mock(name=f"/device:{kind}:{i}") for i in range(max(len(capabilities), 1))]
        return [] if device_type in ("GPU", "TPU") else real_logical(device_type)

    def physical(device_type=None):
        if kind and device_type == kind:
            return [f"{kind}:{i}" for i in range(len(capabilities))]
        return [] if device_type in ("GPU", "TPU") else real_physical(device_type)

    def details(device):
        return {"device_name": name, "compute_capability": capabilities[int(device.split(":")[1])]}

    real_logical, real_physical = tf.config.list_logical_devices, tf.config.list_physical_devices
    return mock.patch.multiple(tf.config, list_logical_devices=mock.Mock(side_effect=logical),
                               list_physical_devices=mock.Mock(side_effect=physical)), \
        mock.patch.object(tf.config.experimental, "get_device_details", side_effect=details)


@pytest.mark.parametrize("kind, capabilities, native_cpu_bf16, expected", [
    ("TPU", (), False, "mixed_bfloat16"),
    ("GPU", ((8, 0), (8, 0)), False, "mixed_bfloat16"),   # A100
    ("GPU", ((9, 0),), False, "mixed_bfloat16"),          # H100
    ("GPU", ((7, 0),), True, "mixed_float16"),            # V100: no bf16 tensor cores
    ("GPU", ((8, 0), (7, 5)), False, "mixed_float16"),    # a mixed host: the weakest GPU decides
    (None, (), True, "mixed_bfloat16"),                   # CPU with AVX512-BF16/AMX
    (None, (), False, "float32"),
])
def test_auto_precision_per_device(kind, capabilities, native_cpu_bf16, expected):
    devices, details = fake_devices(kind, capabilities)
    with devices, details, mock.patch.object(precision, "cpu_has_native_bf16", return_value=native_cpu_bf16):
        assert precision.resolve_precision("auto") == expected
        assert precision.resolve_precision("float32") == "float32"  # explicit requests are kept


@pytest.mark.parametrize("kind, expected", [(None, True), ("GPU", False), ("TPU", False)])
def test_fuse_elementwise_auto_is_on_for_cpu_only(kind, expected):
    devices, details = fake_devices(kind, ((8, 0),))
    with devices, details:
        assert fusion.resolve_fuse_elementwise("auto") is expected
        assert fusion.resolve_fuse_elementwise(True) is True and fusion.resolve_fuse_elementwise(False) is False


def test_runtime_config_fuse_elementwise_values():
    assert RuntimeConfig().fuse_elementwise == "auto"
    with pytest.raises(ValueError, match="--fuse_elementwise='sometimes'"):
        RuntimeConfig(fuse_elementwise="sometimes")
    with pytest.raises(ValueError, match="--peak_tflops=-1"):
        RuntimeConfig(peak_tflops=-1)


def test_fuse_elementwise_flag_takes_bool_syntax_and_auto():
    # From common_flags: importing launch.train here would define its flags a second time in this process.
    from launch.common_flags import BoolOrAutoParser  # noqa: PLC0415
    parser = BoolOrAutoParser()
    assert [parser.parse(v) for v in ("auto", "AUTO", "true", "false", "1", "0")] == ["auto", "auto", 1, 0, 1, 0]
    with pytest.raises(ValueError):
        parser.parse("sometimes")


@pytest.mark.parametrize("kind, name, policy, expected", [
    ("GPU", "NVIDIA A100-SXM4-80GB", "mixed_bfloat16", 312),
    ("GPU", "NVIDIA A100-PCIE-40GB", "mixed_float16", 312),
    ("GPU", "NVIDIA H100 80GB HBM3", "mixed_bfloat16", 989),
    ("GPU", "NVIDIA H100 PCIe", "mixed_bfloat16", 756),
    ("GPU", "Tesla V100-SXM2-16GB", "mixed_float16", 125),
    ("GPU", "Tesla V100-SXM2-16GB", "mixed_bfloat16", None),  # no bf16 units: no honest peak
    ("GPU", "Tesla T4", "mixed_float16", 65),
    ("GPU", "NVIDIA GeForce RTX 4090", "mixed_float16", None),
    ("TPU", "v3-8", "mixed_bfloat16", 61.5),                 # 123 per chip, two TensorCores = two TF devices
    ("TPU", "v4-32", "mixed_bfloat16", 275),
    ("TPU", "v5litepod-16", "mixed_bfloat16", 197),
    ("TPU", "v5p-8", "float32", 459),
    ("TPU", "TPU", "mixed_bfloat16", None),
])
def test_device_peak_table(kind, name, policy, expected):
    assert precision.device_peak_tflops(kind, name, policy) == expected


def test_float32_on_a100_uses_tf32_unless_disabled():
    assert precision.device_peak_tflops("GPU", "NVIDIA A100-SXM4-40GB", "float32") == 156
    try:
        tf.config.experimental.enable_tensor_float_32_execution(False)
        assert precision.device_peak_tflops("GPU", "NVIDIA A100-SXM4-40GB", "float32") == 19.5
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(True)


def test_peak_flops_multiplies_devices_and_takes_the_override():
    with mock.patch.object(precision, "accelerator", return_value=("GPU", "NVIDIA A100-SXM4-40GB")):
        peak, text = precision.peak_flops("mixed_bfloat16", num_replicas=8)
        assert peak == 8 * 312e12 and "x 8 device(s)" in text
        assert precision.peak_flops("mixed_bfloat16", num_replicas=8, override_tflops=100)[0] == 8 * 100e12
    with mock.patch.object(precision, "accelerator", return_value=("TPU", "v3-8")):
        assert precision.peak_flops("mixed_bfloat16", num_replicas=8)[0] == 8 * 61.5e12  # = 4 chips x 123
    with mock.patch.object(precision, "accelerator", return_value=("GPU", "Some Future GPU")):
        peak, text = precision.peak_flops("mixed_bfloat16", num_replicas=2)
        assert peak is None and "--peak_tflops" in text
    # CPU: the measured matmul peak of one host (logical CPU devices share it), per worker.
    with mock.patch.object(precision, "accelerator", return_value=("CPU", "AMD EPYC")), \
            mock.patch.object(precision, "matmul_gflops", return_value=500.0):
        assert precision.peak_flops("float32", num_replicas=2)[0] == 500e9
        assert precision.peak_flops("float32", num_replicas=2, num_workers=2)[0] == 1000e9


def test_tpu_accelerator_type_from_the_environment(monkeypatch):
    devices, details = fake_devices("TPU", ())
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v4-8")
    with devices, details:
        assert precision.accelerator() == ("TPU", "v4-8")


class FlopsToyTask(ToyTask):
    def train_flops_per_example(self):
        return 1e6


@pytest.mark.parametrize("device, peak", [(("GPU", "NVIDIA A100-SXM4-40GB"), 2 * 156e12),
                                          (("GPU", "Unknown GPU"), None)])
def test_trainer_mfu_uses_the_table(tmp_path, device, peak):
    with mock.patch.object(precision, "accelerator", return_value=device):
        trainer = run_training(FlopsToyTask, global_batch_size=16, train_steps=2, strategy="mirrored",
                               model_dir=str(tmp_path))
    history = trainer.train_history[-1]
    if peak is None:
        assert "mfu" not in history
    else:
        assert history["mfu"] == pytest.approx(1e6 * history["examples/sec"] / peak)


def test_the_engine_turns_onednn_on_unless_told_and_a_bench_serving_host_keeps_tensorflows_default():
    # TensorFlow leaves oneDNN off on CPUs without AVX-512 VNNI (AVX2-only ones); the engine's import turns it on
    # before TensorFlow loads, and a setting of the user's wins. One process per case: TF reads it once.
    probe = ("import engine; from engine import host; "
             "from tensorflow.python.util import _pywrap_util_port as port; "
             "print(port.IsMklEnabled(), engine.ONEDNN_OPTS_DEFAULTED, "
             "host.serving_host_environment().get('TF_ENABLE_ONEDNN_OPTS'))")
    # As a user's shell starts it: without this process's setting and the engine's mark of it.
    base = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", engine.ONEDNN_DEFAULT_MARKER)}
    # A process started by an engine program inherits both and keeps the parent's view: a default, not the user's.
    inherited = {"TF_ENABLE_ONEDNN_OPTS": "1", engine.ONEDNN_DEFAULT_MARKER: "1"}
    for setting, expected in ((None, "True True None"), ({"TF_ENABLE_ONEDNN_OPTS": "0"}, "False False 0"),
                              ({"TF_ENABLE_ONEDNN_OPTS": "1"}, "True False 1"), (inherited, "True True None"),
                              (dict(inherited, TF_ENABLE_ONEDNN_OPTS="0"), "False False 0")):
        env = dict(base, **(setting or {}))
        result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.split("\n")[-2] == expected, (setting, result.stdout)
