"""The `finetune` stage: contrastive fine-tuning of an open_clip model on the train split.

What a run does
- Symmetric InfoNCE (open_clip's `ClipLoss`), learnable logit scale clamped at 100 (log 4.605).
- AdamW with weight decay on matrices only (not on biases, norms, embeddings' gains or the logit
  scale); two learning rates: the pretrained tower blocks get `--lr`, the projection heads and the
  logit scale `--head-lr`. Linear warmup counted in optimizer steps (default: 5 % of the run, at most
  one epoch — open_clip's 10,000-step default would be ~40 epochs of Flickr8k), then cosine to 0.
  Gradient-norm clipping. fp32 weights; bf16 autocast only on GPU.
- Freezing: `--lock-image` / `--lock-text` freeze a tower's pretrained blocks (its projection head
  stays trainable), `--unlock-image-last N` / `--unlock-text-last N` unfreeze only the last N blocks.
  BatchNorm statistics are never updated: fine-tuning batches are small, and moving the running
  stats would change the frozen part of the tower for every image.
- Batches hold distinct images with one caption each, the caption drawn again every epoch, so an
  image's other captions are never its negatives.
- Validation recall (both directions, exact) after every epoch; the best epoch by mean R@1/5/10 is
  kept; early stopping after `--patience` epochs without improvement; the state after each epoch is
  saved, so an interrupted run with the same inputs and options resumes where it stopped.
- WiSE-FT: (1 - α) θ_start + α θ_finetuned over `--wise-alphas`, scored on val; the best α is saved.
- Guards: a non-finite loss, or val embeddings whose mean pairwise cosine is near 1 (collapse), stop
  the run with a `FinetuneError` that says what happened and what to change.

Two ways to compute the same thing
- Pixel path (any open_clip model): JPEGs through `preprocess_train` and the whole model.
- Feature path (families with a feature cache: `lit-effnet-minilm`; towers locked except the last
  N blocks): the frozen
  part of each tower runs once over every image and caption; its outputs are cached under
  `<out>/features/` and training runs only the unlocked blocks and the heads — the model's own
  modules, so the trained model *is* the checkpoint (no separate head to write back). Frozen blocks
  are run with BatchNorm folded into the convolutions for speed (checked against the unfolded
  blocks on the first batch).

Outputs: `<out>/models/<name>.pt` (a weights-only state dict that `load_model(model, path)` takes),
`<out>/models/<name>.json` (what it was trained from, for idempotence),
`<out>/results/finetune_<name>.json` (per-epoch loss, lr, logit scale and val R@K; test R@K of the
starting and the final model; the WiSE-FT sweep) and `<out>/results/finetune_<name>.png`.
`train_offline_model` is the recipe `build --model lit-effnet-minilm` runs when no checkpoint is given.

The package, one concern a file (after open_clip_train's params / optim / scheduler / train / main):
  config.py    FinetuneConfig, its CLI flags (`add_arguments`) and checks; FinetuneError
  parts.py     which parameters train: tower blocks and heads (from the model's family), freezing,
               frozen BatchNorm, feature dropout, the trained state and its WiSE-FT interpolation
  optim.py     learning rates, AdamW, warmup + cosine
  guards.py    non-finite loss and embedding collapse
  inputs.py    splits, each epoch's batch plan, the `Backend` protocol and `PixelBackend`
  features.py  the cached frozen-tower features and `FeatureBackend` on top of them
  cca.py       the CCA start for the projection heads
  loop.py      `train_one_epoch`, `train_stage` (resume, epochs, selection), `wise_ft`
  soup.py      `soup_stage`: N seeds of a stage, averaged
  report.py    checkpoint, results JSON + plot (`offline.plots`), the returned summary
  runner.py    `finetune` (stages in order, idempotent) and `run` (the CLI's entry)
  recipe.py    the offline model's recipe, `train_offline_model`
"""

# The stage's public names, so callers keep `from offline import finetune; finetune.run(args)`.
from dataclasses import asdict  # (callers wrote `finetune.asdict(cfg)` when this was one module)

from offline.finetune.cca import cca_init_heads, head_inputs
from offline.finetune.config import (DEFAULT_COLLAPSE_COSINE, FINETUNE_FORMAT, SPLITS, FinetuneConfig, FinetuneError,
                                     add_arguments, config_dict, config_from_args, validate_config)
from offline.finetune.features import (FEATURE_FORMAT, FeatureBackend, TokenStates, extract_features,
                                       feature_cache_dir, fold_batchnorm)
from offline.finetune.guards import (COLLAPSE_SAMPLE, check_collapse, check_loss, collapse_stats,
                                     mean_pairwise_cosine)
from offline.finetune.inputs import Backend, PixelBackend, PlannedBatch, SplitData, epoch_batches, read_split_data
from offline.finetune.loop import (MAX_LOGIT_SCALE, StageResult, recall_of, train_one_epoch, train_stage, val_score,
                                   wise_ft)
from offline.finetune.optim import build_optimizer, default_warmup, resolve_lrs, warmup_cosine
from offline.finetune.parts import (TowerParts, feature_dropout, interpolate, load_trainable, set_trainable,
                                    tower_parts, train_mode, trainable_state, whole_model_parts)
from offline.finetune.recipe import offline_recipe, offline_run_name, train_offline_model
from offline.finetune.report import save_checkpoint, stage_dict, summary, write_results
from offline.finetune.runner import finetune, run
from offline.finetune.soup import soup_stage

__all__ = [
    "COLLAPSE_SAMPLE", "DEFAULT_COLLAPSE_COSINE", "FEATURE_FORMAT", "FINETUNE_FORMAT", "MAX_LOGIT_SCALE", "SPLITS",
    "Backend", "FeatureBackend", "FinetuneConfig", "FinetuneError", "PixelBackend", "PlannedBatch", "SplitData",
    "StageResult", "TokenStates", "TowerParts", "add_arguments", "build_optimizer", "cca_init_heads",
    "check_collapse", "check_loss", "collapse_stats", "config_dict", "config_from_args", "default_warmup",
    "epoch_batches", "extract_features", "feature_cache_dir", "feature_dropout", "finetune", "fold_batchnorm",
    "head_inputs", "interpolate", "load_trainable", "mean_pairwise_cosine", "offline_recipe", "offline_run_name",
    "read_split_data", "recall_of", "resolve_lrs", "run", "save_checkpoint", "set_trainable", "soup_stage",
    "stage_dict", "summary", "tower_parts", "train_mode", "train_offline_model", "train_one_epoch", "train_stage",
    "trainable_state", "val_score", "validate_config", "warmup_cosine", "whole_model_parts", "wise_ft",
    "write_results", "asdict",
]
