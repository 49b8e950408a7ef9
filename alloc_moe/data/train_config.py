"""The settings of `alloc-moe train` (`TrainConfig`), apart from the training loop so that reading them (the workflow's
start counts a trained model's MoE layers from them) does not import torch."""

import dataclasses
import math

from ..errors import AllocMoeError


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    arch: str = "olmoe"  # the embedded default (README: why not the paper's DeepSeek-V2 layout)
    width: str = "small"
    layers: int = 8
    steps: int = 900
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    aux_loss_coef: float = 1e-4
    z_loss_coef: float = 0.0
    router_lr_mult: float = 1.5
    seed: int = 0
    checkpoint_every: int = 50
    corpus: str = "v3"  # synthetic corpus version (alloc_moe.data.synthetic.CORPORA; = its CORPUS): v3 has a world to learn

    def check(self) -> None:
        from .synthetic import corpus_spec

        corpus_spec(self.corpus)  # one-line error naming the versions
        for name in ("layers", "steps", "batch_size", "seq_len", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise AllocMoeError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "aux_loss_coef", "z_loss_coef", "weight_decay", "router_lr_mult"):
            v = getattr(self, name)
            positive = name in ("lr", "router_lr_mult")
            if not (math.isfinite(v) and v >= 0) or (positive and v == 0):
                raise AllocMoeError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {v}")
