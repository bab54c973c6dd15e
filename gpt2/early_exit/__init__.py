"""Early exit: stop a token after block k when a small classifier says the deeper blocks would not change it.

One module per idea (the design itself is described in gpt2.early_exit.model):

- classifier: the exit head, the classifier's features and the classifier (`ExitClassifier`)
- model: the model that exits (`EarlyExitGPT`), its exit layer, statistics and per-token cost
- training: the classifier's training data from the frozen backbone, and its training loop
- calibration: held-out batches through the backbone once, the tau sweep on them and the choice of tau
- files: the classifier saved beside a base checkpoint (`early_exit.json`, `early_exit.safetensors`) and loaded back

The names below are the package's public ones: import them from here (`from gpt2.early_exit import EarlyExitGPT`).
"""

from gpt2.early_exit.calibration import HeldOut, calibrate, choose_threshold, held_out
from gpt2.early_exit.classifier import HEAD_FEATURES, ExitClassifier, exit_features, exit_head
from gpt2.early_exit.files import (
    EXIT_CONFIG_FILE,
    EXIT_FORMAT_VERSION,
    EXIT_WEIGHTS_FILE,
    load_early_exit,
    save_early_exit,
)
from gpt2.early_exit.model import (
    DEFAULT_THRESHOLD,
    DecodeMacs,
    EarlyExitGPT,
    ExitedKeyValues,
    ExitStats,
    check_exit_layer,
    default_exit_layer,
)
from gpt2.early_exit.training import exit_features_and_labels, train_classifier

__all__ = [
    "DEFAULT_THRESHOLD",
    "EXIT_CONFIG_FILE",
    "EXIT_FORMAT_VERSION",
    "EXIT_WEIGHTS_FILE",
    "HEAD_FEATURES",
    "HeldOut",
    "DecodeMacs",
    "EarlyExitGPT",
    "ExitClassifier",
    "ExitStats",
    "ExitedKeyValues",
    "calibrate",
    "check_exit_layer",
    "choose_threshold",
    "default_exit_layer",
    "exit_features",
    "exit_features_and_labels",
    "exit_head",
    "held_out",
    "load_early_exit",
    "save_early_exit",
    "train_classifier",
]
