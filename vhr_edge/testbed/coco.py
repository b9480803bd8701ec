"""Testbed ground truth in COCO instances format, so the same CHAIR / POPE code reads both.

`to_coco` gives the usual keys (info, images, annotations, categories). Category ids are
1..16 in world order, supercategory = the home context. Annotations carry bbox [x, y, w, h]
in pixels of the exported size, area = w * h, iscrowd = 0, plus two non-standard fields:
"colour" and "position". Images carry the non-standard "scene_id", "split", "context" and
"missing_partners" (the absent habitual partners of present objects), and "scene" (the full
`Scene.to_dict()`, from which `scenes_from_coco` rebuilds the scenes).

`write_split` renders a split to out_dir/images/{scene id}.png and writes out_dir/instances.json:

    python -m vhr_edge.testbed.coco counterfactual 200 --seed 0 --out data/cf
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import world
from .scenes import Scene, make_split, render

CATEGORY_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(world.NAMES)}


def categories() -> list[dict]:
    return [{"id": CATEGORY_IDS[c.name], "name": c.name, "supercategory": c.home}
            for c in world.CATEGORIES]


def to_coco(scenes: list[Scene], image_dir: str | None = None, size: int = 64) -> dict:
    """COCO instances dict for `scenes` rendered at size x size (file_name under image_dir)."""
    images, annotations = [], []
    for img_id, s in enumerate(scenes, start=1):
        k = size / s.size
        name = f"{s.id}.png"
        images.append({
            "id": img_id,
            "file_name": str(Path(image_dir) / name) if image_dir else name,
            "width": size,
            "height": size,
            "scene_id": s.id,
            "split": s.split,
            "context": s.context,
            "missing_partners": list(s.missing_partners),
            "scene": s.to_dict(),
        })
        for o in s.in_caption_order():
            x, y, w, h = (round(v * k, 2) for v in o.bbox)
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": img_id,
                "category_id": CATEGORY_IDS[o.category],
                "bbox": [x, y, w, h],
                "area": round(w * h, 2),
                "iscrowd": 0,
                "colour": o.colour,
                "position": o.position,
            })
    return {
        "info": {"description": "vhr-edge testbed scenes", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories(),
    }


def scenes_from_coco(coco: dict) -> list[Scene]:
    """The scenes back from a `to_coco` dict (via each image's "scene" field)."""
    return [Scene.from_dict(img["scene"]) for img in coco["images"]]


def write_split(split: str, n: int, seed: int, out_dir: str | Path, size: int = 64) -> Path:
    """Render `n` scenes of `split` to out_dir/images/*.png and write out_dir/instances.json."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scenes = make_split(split, n, seed)
    for s in scenes:
        render(s, size).save(out / "images" / f"{s.id}.png", optimize=False)
    path = out / "instances.json"
    path.write_text(json.dumps(to_coco(scenes, "images", size)))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a testbed split as PNGs + COCO instances.json")
    ap.add_argument("split", choices=["unbiased", "train", "indist", "counterfactual"])
    ap.add_argument("n", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    print(write_split(a.split, a.n, a.seed, a.out, a.size))


if __name__ == "__main__":
    main()
