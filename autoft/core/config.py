"""The plain configuration of one fine-tuning run (what a search trial chooses)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrialConfig(BaseModel):
    """Everything that decides one fine-tune. Engine-neutral; serialisable to YAML."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backbone: str
    unfreeze: int = Field(0, ge=0, description="train the last k stages; 0 = head only")
    lr: float = Field(1e-3, gt=0, description="learning rate of the unfrozen backbone stages")
    head_lr_mult: float = Field(10.0, gt=0, description="head learning rate = lr * head_lr_mult")
    head: Literal["linear", "mlp"] = "linear"
    head_width: int = Field(256, ge=1)
    head_depth: int = Field(1, ge=1, le=2, description="hidden layers of the MLP head")
    dropout: float = Field(0.0, ge=0, lt=1)
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(64, ge=1)
    epochs: int = Field(5, ge=1)
    head_first: int = Field(
        0, ge=0, description="depth as a fidelity (LP-FT, Kumar et al. 2022): the first head_first epochs train the "
        "head alone on the cached pooled features (as unfreeze 0, cheap), then the last `unfreeze` stages and the "
        "warm-started head train for the other epochs (own optimizer and schedule). Every epoch is reported, so a "
        "pruner can stop a trial while it is still head-only. 0 = off; below epochs when unfreeze > 0 (checked "
        "when the trial runs); ignored with unfreeze 0")
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup: float = Field(0.0, ge=0, lt=1, description="fraction of all steps spent warming up linearly")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    loss: Literal["ce", "weighted", "focal"] = Field(
        "ce", description="training loss (training-only; prediction is unchanged), autoft.core.losses: ce = cross "
        "entropy; weighted = cross entropy with class weights w_c = C * (1/n_c) / sum_k(1/n_k) from the class "
        "counts n_c of the rows trained on (the training split; mean weight over classes 1); focal = focal loss "
        "(Lin et al. 2017) (1 - p_true)^focal_gamma * cross entropy, without class weights. label_smoothing "
        "applies to all three")
    focal_gamma: float = Field(2.0, ge=0, le=10, description="focusing parameter of loss=focal (0 = cross entropy); "
                               "ignored by the other losses")
    augment: Literal["none", "light", "strong"] = Field(
        "none", description="training augmentation of images: light = RandomResizedCrop + horizontal flip, "
        "strong = light + TrivialAugmentWide; none keeps the frozen prefix cacheable (exact)")
    bn: Literal["train", "frozen"] = Field(
        "train", description="batch-norm statistics of the trained stages: train (batch statistics, running "
        "averages updated) or frozen (BatchNorm layers in eval mode); checkpoints with folded batch norm "
        "are always frozen (their zoo record says so)")
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on a GPU that computes it natively, else fp32 (the CPU); "
        "bf16/fp16: mixed precision of the trainable part (fp16 with a gradient scaler), autoft.core.precision")

    @property
    def head_lr(self) -> float:
        return self.lr * self.head_lr_mult
