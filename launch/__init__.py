"""absl-flag programs: train, evaluate (one checkpoint, or a sidecar following a run), predict, export, convert, soup.

Their options are declared once, on the config dataclasses (engine/config.py, each Task's config.py):
config_flags.py defines the programs' flags from those fields and builds the configs back from the parsed values;
common_flags.py holds the launch-only flags several programs share (--task, the data files, --cpu_devices);
errors.py turns input, flag and checkpoint errors into one line.
"""
import engine  # noqa: F401  (TensorFlow's environment, set before it loads: engine/__init__.py)
