"""Fine-tuning options: `FinetuneConfig` (everything that changes a run's result), its CLI flags and checks.

`FinetuneError` lives here too: every part of the stage raises it for a reason the user must act on.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any

FINETUNE_FORMAT = 1
SPLITS = ("train", "val", "test")
# mean pairwise cosine above which a batch of val embeddings counts as collapsed
DEFAULT_COLLAPSE_COSINE = 0.99


class FinetuneError(ValueError):
    """Fine-tuning stopped for a reason the user must act on (NaN loss, collapse, bad options).

    A ValueError so that `offline.cli.main` reports it in one line with exit code 2.
    """


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that changes the result of a run (and so goes into its idempotence key)."""

    epochs: int = 10
    lr: float | None = None            # tower blocks; None: 1e-5 if pretrained, 1e-3 from scratch
    head_lr: float | None = None       # projection heads + logit scale; None: 1e-3 if fresh, else lr
    weight_decay: float = 0.1
    warmup_steps: int | None = None    # None: 5 % of all steps, at most one epoch
    batch_size: int = 128
    lock_image: bool = False
    lock_text: bool = False
    unlock_image_last: int | None = None
    unlock_text_last: int | None = None
    feature_dropout: float = 0.0       # dropout on the tower features entering each projection head
    grad_clip: float = 1.0
    patience: int = 3
    wise_alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    seed: int = 0
    feature_cache: bool = True
    init_logit_scale: float | None = None  # reset the (un-logged) scale, e.g. 1/0.07 for fresh heads
    head_init: str = "keep"            # "keep" the heads as loaded, or start them from regularised "cca"
    soup: int = 1                      # train the stage this many times (seeds seed, seed+1, ...) and average
    cca_reg: float = 3.0               # ridge on each covariance, relative to its mean eigenvalue
    cca_power: float = 1.0             # directions weighted by canonical correlation ** (power / 2)
    collapse_cosine: float = DEFAULT_COLLAPSE_COSINE
    eval_test: bool = True
    mirror: bool = False               # train on images or their mirrors, select on mirror-averaged images

    def image_unlocked(self) -> int | None:
        """Trailing image blocks that train: None = all (tower unlocked), 0 = none."""
        if self.unlock_image_last is not None:
            return self.unlock_image_last
        return 0 if self.lock_image else None

    def text_unlocked(self) -> int | None:
        if self.unlock_text_last is not None:
            return self.unlock_text_last
        return 0 if self.lock_text else None


def _alphas(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or any(not 0.0 <= a <= 1.0 for a in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Finetune-only options; `--out --threads --force -v --model --pretrained --device --batch-size
    --workers` come from the shared CLI (`--batch-size` is the encoding batch size for validation)."""
    d = FinetuneConfig()
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--epochs", type=int, default=d.epochs, help="maximum epochs (default: %(default)s)")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate of the tower blocks (default: 1e-5 for pretrained weights, "
                        "1e-3 for a model trained from scratch)")
    g.add_argument("--head-lr", type=float, default=None,
                   help="learning rate of the projection heads and logit scale (default: 1e-3 when the "
                        "heads are freshly initialised, e.g. lit-effnet-minilm without a checkpoint; "
                        "otherwise --lr)")
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay on weight matrices (default: %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup in optimizer steps, then cosine (default: 5%% of the run, at most "
                        "one epoch)")
    g.add_argument("--train-batch-size", type=int, default=d.batch_size,
                   help="images per training batch, one caption each (default: %(default)s)")
    g.add_argument("--lock-image", action="store_true", help="freeze the image tower (its head still trains)")
    g.add_argument("--lock-text", action="store_true", help="freeze the text tower (its head still trains)")
    g.add_argument("--unlock-image-last", type=int, default=None, metavar="N",
                   help="train only the last N blocks of the image tower (0 = locked)")
    g.add_argument("--unlock-text-last", type=int, default=None, metavar="N",
                   help="train only the last N blocks of the text tower (0 = locked)")
    g.add_argument("--feature-dropout", type=float, default=d.feature_dropout,
                   help="dropout on the tower features entering the projection heads (default: %(default)s)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help="clip the gradient norm to this (0 = off; default: %(default)s)")
    g.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many epochs without a better val recall (default: %(default)s)")
    g.add_argument("--wise-alphas", type=_alphas, default=d.wise_alphas,
                   help="WiSE-FT mixing weights scored on val, comma-separated (default: 0,0.25,0.5,0.75,1)")
    g.add_argument("--init-logit-scale", type=float, default=None,
                   help="reset the logit scale (temperature 1/T) before training")
    g.add_argument("--collapse-cosine", type=float, default=d.collapse_cosine,
                   help="stop when a val batch's mean pairwise cosine exceeds this (embedding collapse; "
                        "default: %(default)s)")
    g.add_argument("--soup", type=int, default=d.soup,
                   help="train the stage N times from the same start with seeds seed..seed+N-1 and average "
                        "the trained weights (a model soup), kept only if it beats the best single run on "
                        "val (default: %(default)s = one run)")
    g.add_argument("--head-init", choices=("keep", "cca"), default=d.head_init,
                   help="start the projection heads as loaded ('keep') or from regularised CCA of the "
                        "train pairs' tower features ('cca': linear bias-free heads only) "
                        "(default: %(default)s)")
    g.add_argument("--cca-reg", type=float, default=d.cca_reg,
                   help="CCA ridge, relative to each covariance's mean eigenvalue (default: %(default)s)")
    g.add_argument("--cca-power", type=float, default=d.cca_power,
                   help="weight CCA directions by correlation ** (power / 2) (default: %(default)s)")
    g.add_argument("--mirror", action="store_true",
                   help="train on each image or its horizontal mirror (a coin per image and step) and "
                        "score val with each image averaged with its mirror, as a model served with "
                        "--image-tta mirror embeds it (cached-feature path only)")
    g.add_argument("--seed", type=int, default=d.seed, help="training seed (default: %(default)s)")
    g.add_argument("--no-feature-cache", dest="feature_cache", action="store_false",
                   help="always run the whole model on pixels, even when the frozen towers could be cached")
    g.add_argument("--no-test-eval", dest="eval_test", action="store_false",
                   help="skip test recall of the starting and final model in the results")
    g.add_argument("--name", default=None,
                   help="name of the checkpoint and results files (default: <model>-ft)")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    cfg = FinetuneConfig(
        epochs=args.epochs, lr=args.lr, head_lr=args.head_lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, batch_size=args.train_batch_size, lock_image=args.lock_image,
        lock_text=args.lock_text, unlock_image_last=args.unlock_image_last,
        unlock_text_last=args.unlock_text_last, feature_dropout=args.feature_dropout,
        grad_clip=args.grad_clip, patience=args.patience, wise_alphas=tuple(args.wise_alphas),
        seed=args.seed, feature_cache=args.feature_cache, init_logit_scale=args.init_logit_scale,
        head_init=args.head_init, cca_reg=args.cca_reg, cca_power=args.cca_power, soup=args.soup,
        collapse_cosine=args.collapse_cosine, eval_test=args.eval_test, mirror=args.mirror,
    )
    validate_config(cfg)
    return cfg


def validate_config(cfg: FinetuneConfig) -> None:
    if cfg.epochs < 1:
        raise FinetuneError("--epochs must be at least 1.")
    if cfg.batch_size < 2:
        raise FinetuneError("--train-batch-size must be at least 2: a contrastive batch needs negatives.")
    for name in ("unlock_image_last", "unlock_text_last", "warmup_steps"):
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise FinetuneError(f"--{name.replace('_', '-')} must not be negative.")
    if not 0.0 <= cfg.feature_dropout < 1.0:
        raise FinetuneError("--feature-dropout must be in [0, 1).")
    if cfg.lr is not None and cfg.lr < 0 or cfg.head_lr is not None and cfg.head_lr < 0:
        raise FinetuneError("learning rates must not be negative.")
    if cfg.soup < 1:
        raise FinetuneError("--soup must be at least 1.")
    if cfg.head_init not in ("keep", "cca"):
        raise FinetuneError("--head-init must be 'keep' or 'cca'.")
    if cfg.cca_reg < 0:
        raise FinetuneError("--cca-reg must not be negative.")
    if not 0.0 < cfg.collapse_cosine <= 1.0:
        raise FinetuneError("--collapse-cosine must be in (0, 1].")


def config_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    """The config as JSON, the run key's part. Options added after the first format are left out
    while at their default, so runs made before them keep their keys (and checkpoints)."""
    d = asdict(cfg)
    d["wise_alphas"] = list(cfg.wise_alphas)
    if not cfg.mirror:
        del d["mirror"]
    return d

