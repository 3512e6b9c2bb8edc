"""The training configuration: defaults here, overridden by a TOML file (``--config``) and then by flags."""
from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import ConfigError
from common.model.gates import POLICY_NAMES


def check_targets(target_accuracy: float | None, target_drop: float | None, budget_flops: float | None) -> None:
    """The calibration targets of a training config or a calibration command: at most one, each in its range.
    Messages name the config key and the command-line flag, since both lead here."""
    if sum(x is not None for x in (target_accuracy, target_drop, budget_flops)) > 1:
        raise ConfigError("give at most one of target_accuracy, target_drop and budget_flops "
                          "(--target-accuracy, --target-drop, --budget-flops)")
    if target_drop is not None and not target_drop >= 0:
        raise ConfigError(f"target_drop (--target-drop) must be >= 0 points, got {target_drop}")
    if budget_flops is not None and not budget_flops > 0:
        raise ConfigError(f"budget_flops (--budget-flops) must be a positive fraction, got {budget_flops}")
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise ConfigError(f"target_accuracy (--target-accuracy) must lie in (0, 1], got {target_accuracy}")


# Written into checkpoints' configs by training.heads before it kept its record apart (meta["heads"]).
_NOT_SETTINGS = ("heads_epochs", "heads_views")


def _h(text: str):
    return field(default=None, metadata={"help": text})


@dataclass
class TrainConfig:
    data: str = field(default="synthetic", metadata={
        "help": "data spec: synthetic, cifar10:DIR, cifar100:DIR, mnist:DIR, imagefolder:DIR, imagenette:DIR"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation, shuffling and the validation hold-out"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of the training data held out for calibration"})
    download: bool = field(default=False, metadata={"help": "allow torchvision to download CIFAR"})
    limit_train: int | None = _h("use at most this many training samples")
    limit_val: int | None = _h("use at most this many validation samples")
    # Model
    architecture: str = field(default="resnet18_cifar", metadata={"help": "registered backbone"})
    plugin: list[str] = field(default_factory=list, metadata={
        "help": "modules to import first, e.g. ones registering backbones of your own"})
    pretrained: str | None = _h("local weights file (.safetensors, or a state dict read weights-only) to start from")
    width: float = field(default=0.25, metadata={"help": "channel width multiplier"})
    exit_points: list[int] | None = field(default=None, metadata={
        "help": "stage boundaries of the early exits: two for the device and edge tiers (default: the backbone's "
                "own), or more and let python -m scripts.plan choose two"})
    image_size: int | None = _h("side of the square images an image folder is read at (default: 32, imagenette 224)")
    exit_conv_channels: int = field(default=0, metadata={"help": "channels of a 3x3 conv in the exit heads (0 = "
                                                                 "none: global pool + linear)"})
    exit_conv_stride: int = field(default=2, metadata={"help": "stride of the exit heads' conv"})
    exit_conv_layers: int = field(default=1, metadata={
        "help": "conv layers in the exit heads (the first strided, the others not)"})
    cascade: bool = field(default=False, metadata={
        "help": "every early exit head but the first also reads the previous early exit's logits (detached)"})
    bottleneck_channels: int = field(default=0, metadata={
        "help": "learned bottleneck on the device->edge link: channels the device sends (0 = none)"})
    bottleneck_stride: int = field(default=1, metadata={"help": "bottleneck: spatial downsampling of what is sent"})
    # Optimisation
    mode: str = field(default="joint", metadata={"help": "joint (weighted sum of exit losses) or staged"})
    epochs: int = field(default=3, metadata={"help": "joint mode: epochs over the training data"})
    epochs_backbone: int = field(default=3, metadata={"help": "staged mode: epochs of backbone training"})
    epochs_exits: int = field(default=2, metadata={"help": "staged mode: epochs of exit training, backbone frozen"})
    loss_weights: list[float] = field(default_factory=lambda: [0.5, 0.5, 1.0],
                                      metadata={"help": "weight of each exit's loss, earliest first"})
    distill: float = field(default=0.0, metadata={
        "help": "temperature T > 0: early exits also learn the final exit's softened outputs (self-distillation)"})
    batch_size: int = field(default=128, metadata={"help": "training batch size"})
    lr: float = field(default=0.1, metadata={"help": "peak learning rate (SGD, one-cycle schedule)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay"})
    augment: str = field(default="auto", metadata={"help": "auto, none or crop_flip (auto: none for synthetic)"})
    max_batches: int | None = _h("stop each epoch after this many batches (quick runs, tests)")
    threads: int | None = _h("torch intra-op threads")
    channels_last: bool = field(default=True, metadata={
        "help": "train in NHWC memory format (faster convolutions on CPU; the saved weights are the same)"})
    # Exit policies (third stage): fitted on one half of the validation split, calibrated on the other
    policy: str = field(default="confidence", metadata={
        "help": "active policy in the bundle: confidence, entropy, margin, mlp, cost or ensemble (all are fitted and "
                "stored); both: the static confidence threshold and the learned mlp gate side by side, mlp active"})
    gate_agreement: bool = field(default=False, metadata={
        "help": "mlp policy: its gates also see whether the exit agrees with the previous one (the tiers then carry "
                "the earlier exits' logits)"})
    alpha: float = field(default=0.5, metadata={"help": "cost policy: weight of FLOPs against loss, in [0, 1]"})
    epochs_gates: int = field(default=40, metadata={"help": "epochs of learned-gate fitting on cached exit outputs"})
    gate_max_batches: int | None = _h("stop each gate-fitting epoch after this many batches")
    target_accuracy: float | None = _h("accuracy each early exit must keep (default: final exit's val accuracy)")
    target_drop: float | None = _h("calibrate to the cheapest thresholds within this many points of the final exit")
    budget_flops: float | None = _h("calibrate to the most accurate thresholds within this FLOPs fraction")
    calibration: str = field(default="ltt", metadata={
        "help": "ltt: thresholds certified to meet the target on new data with probability >= 1 - delta "
                "(default target: within 1 point of the final exit); naive: the best thresholds on validation data"})
    delta: float = field(default=0.1, metadata={"help": "ltt: allowed probability that the promise fails"})
    bound: str = field(default="wsr", metadata={"help": "ltt: concentration bound, wsr, hb or binomial"})
    calibration_order: str = field(default="train", metadata={
        "help": "ltt: where candidate thresholds are put in order: train (the training split's exit outputs; the "
                "statistic policies are then certified on the whole validation split, the fitted ones on the half "
                "they were not fitted on) or val (one half of the validation split, certified on the other)"})

    @classmethod
    def from_checkpoint(cls, saved: dict, purpose: str, **changes) -> "TrainConfig":
        """The config a checkpoint was trained with (its metadata's ``config``) with the ``changes`` that are not
        None; ``ConfigError`` ("cannot <purpose> with these settings: ...") when that is not a valid config. Keys an
        older version wrote there that are not settings (``_NOT_SETTINGS``) are left out."""
        values = {k: v for k, v in saved.items() if k not in _NOT_SETTINGS}
        values.update({k: v for k, v in changes.items() if v is not None})
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot {purpose} with these settings: {e}") from None

    def load_split(self, split: str):
        """The ``train`` or ``val`` split of this config's data, held out exactly as training held it out (same
        fraction, seed, limits and image size): a ``common.data.datasets.ImageSet``."""
        from common.data.datasets import load

        limit = self.limit_train if split == "train" else self.limit_val
        return load(self.data, split, download=self.download, val_fraction=self.val_fraction, seed=self.seed,
                    limit=limit, image_size=self.image_size)

    def augments(self) -> bool:
        """Whether training crops and flips its images: ``crop_flip``, or ``auto`` on any data but synthetic (its
        cues are positional) and MNIST (a flipped digit is another digit)."""
        from common.data.datasets import parse_spec

        return self.augment == "crop_flip" or (self.augment == "auto"
                                               and parse_spec(self.data).kind not in ("synthetic", "mnist"))

    def __post_init__(self) -> None:
        from common.model import ExitHeadSpec, backbone_info
        from common.plugins import use_plugins

        use_plugins(self.plugin)  # before the architecture is looked up: a plugin may register it
        if self.exit_points is None:
            self.exit_points = list(backbone_info(self.architecture).exit_points)
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.bottleneck_channels < 0 or self.bottleneck_stride < 1:
            raise ValueError("bottleneck_channels must be >= 0 and bottleneck_stride >= 1, got "
                             f"{self.bottleneck_channels} and {self.bottleneck_stride}")
        try:  # the exit heads' own rule, checked before any training starts
            ExitHeadSpec(self.exit_conv_channels, self.exit_conv_stride, self.exit_conv_layers)
        except ConfigError as e:
            raise ValueError(f"exit_conv_channels / exit_conv_stride / exit_conv_layers: {e}") from None
        if self.mode not in ("joint", "staged"):
            raise ValueError(f"mode must be joint or staged, got {self.mode!r}")
        if self.augment not in ("auto", "none", "crop_flip"):
            raise ValueError(f"augment must be auto, none or crop_flip, got {self.augment!r}")
        if len(self.exit_points) < 2:
            raise ValueError(f"exit_points needs at least 2 stage boundaries (device and edge exits), "
                             f"got {self.exit_points}")
        if len(self.loss_weights) != len(self.exit_points) + 1:
            raise ValueError(f"loss_weights needs {len(self.exit_points) + 1} values (one per exit), "
                             f"got {self.loss_weights}")
        if self.distill < 0:
            raise ValueError(f"distill must be a temperature >= 0 (0 = off), got {self.distill}")
        if self.width <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError("width, batch_size and lr must be positive")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.policy not in (*POLICY_NAMES, "both"):
            raise ValueError(f"policy must be one of {', '.join(POLICY_NAMES)} or both, got {self.policy!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        check_targets(self.target_accuracy, self.target_drop, self.budget_flops)
        if self.calibration not in ("naive", "ltt"):
            raise ValueError(f"calibration must be naive or ltt, got {self.calibration!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {self.delta}")
        if self.bound not in ("wsr", "hb", "binomial"):
            raise ValueError(f"bound must be wsr, hb or binomial, got {self.bound!r}")
        if self.calibration_order not in ("train", "val"):
            raise ValueError(f"calibration_order must be train or val, got {self.calibration_order!r}")
        if any(w < 0 for w in self.loss_weights) or not any(self.loss_weights[:-1]) or not self.loss_weights[-1]:
            raise ValueError("loss_weights must be non-negative, with a positive final weight and at least one "
                             f"positive early-exit weight, got {self.loss_weights}")
