"""Where evaluation images and their ground truth come from.

- `TestbedSource(split, n, seed)`: testbed scenes made by `testbed.scenes.make_split` and
  rendered on the fly (nothing on disk); ids "{split}-{seed}-{index:06d}"; ground truth is
  exact (the scene's categories); the testbed vocabulary. POPE's popular / adversarial
  statistics come from 1000 "indist" scenes (the habits of the training law), so on the
  counterfactual split the adversarial negatives are the missing habitual partners.
- `CocoSource(images_dir, annotations, n, seed, exclude=ids)`: a COCO instances file (instances_val2014.json
  or one written by `testbed.coco`) and its image folder. `n` image ids are drawn from all the
  file's images by `numpy.random.default_rng(seed).permutation`, in that order (so the first
  k of a larger draw with the same seed are a smaller draw). Ground truth per image: the
  categories of its instance annotations, plus (optional `captions` file, as in the CHAIR
  paper) the objects that its reference captions mention. The vocabulary follows the
  category names (`chair.vocabulary_for`): testbed names -> testbed words, else COCO.
  `exclude` removes ids from the pool before the draw (calibration sets disjoint from an
  evaluation run's ids.json; `n_available` then counts the remaining pool).

`add_data_args(parser)` / `source_from_args(args, n, seed)`: the data flags shared by
`vhr-edge eval` and `vhr-edge trace` (batch mode), and the source they name.

`write_ids(out_dir, source)` saves the chosen ids next to the results (ids.json) and refuses an
out dir that already holds a run on other images, so every run in one folder is comparable.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..errors import ConfigError, VhrEdgeError, read_json_file
from . import DEFAULT_N, DEFAULT_SEED, chair


class DataError(VhrEdgeError):
    """Evaluation data that cannot be used (missing file or folder, bad JSON, bad ids)."""


@dataclass
class Item:
    image_id: Any  # str for the testbed, as in the file for COCO (usually int)
    gt: tuple[str, ...]  # present categories, sorted
    load: Callable[[], Any]  # -> anything Session.caption accepts (path or HxWx3 array)
    # How a worker elsewhere gets the same image (`cluster`): ("testbed", split, seed, index, size),
    # rendered there from the seed, or the image file's absolute path.
    portable: Any = None

    @property
    def key(self) -> str:
        return str(self.image_id)


class DataSource:
    kind = ""
    items: list[Item]
    vocab: chair.Vocabulary
    categories: tuple[str, ...]

    @property
    def ids(self) -> list:
        return [it.image_id for it in self.items]

    def describe(self) -> dict:
        raise NotImplementedError

    def pool_gts(self) -> list[tuple[str, ...]]:
        """Ground truth of the whole pool (POPE's popular/adversarial statistics)."""
        return [it.gt for it in self.items]


def _check_n(n: int) -> int:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise DataError(f"-n must be at least 1, got {n}")
    return int(n)


POOL_SCENES = 1000  # testbed scenes behind POPE's popular / adversarial statistics


class TestbedSource(DataSource):
    __test__ = False  # not a pytest class
    kind = "testbed"

    def __init__(self, split: str, n: int = DEFAULT_N, seed: int = DEFAULT_SEED, size: int = 64):
        from ..testbed import SPLITS
        from ..testbed.scenes import make_split, render

        if split not in SPLITS:
            raise DataError(f"unknown testbed split {split!r}; one of {', '.join(SPLITS)}")
        if size < 8:
            raise DataError(f"--size must be at least 8, got {size}")
        self.split, self.n, self.seed, self.size = split, _check_n(n), int(seed), int(size)
        self.scenes = make_split(split, self.n, self.seed)
        self.vocab = chair.testbed_vocabulary()
        self.categories = tuple(self.vocab.categories)

        def loader(scene):
            return lambda: np.asarray(render(scene, self.size))

        self.items = [Item(s.id, tuple(sorted(s.categories)), loader(s), ("testbed", split, self.seed, i, self.size))
                      for i, s in enumerate(self.scenes)]

    def describe(self) -> dict:
        return {"kind": "testbed", "split": self.split, "seed": self.seed, "n": self.n, "size": self.size}

    def pool_gts(self) -> list[tuple[str, ...]]:
        """POPE statistics from the habits the model was trained on, whatever split is scored:
        POOL_SCENES "indist" scenes (the training law, a held-out stream)."""
        from ..testbed.scenes import make_split

        return [tuple(sorted(s.categories)) for s in make_split("indist", POOL_SCENES, self.seed)]


def testbed_image(split: str, seed: int, index: int, size: int) -> np.ndarray:
    """Scene `index` of TestbedSource(split, n > index, seed, size), rendered alone (the same pixels)."""
    from ..testbed.scenes import render, sample_scene, scene_rng

    scene = sample_scene(scene_rng(split, seed, index), split, f"{split}-{seed}-{index:06d}")
    return np.asarray(render(scene, size))


def _read_json(path: Path, what: str) -> Any:
    return read_json_file(path, what, DataError)


def _id_sort_key(x):
    return (0, x, "") if isinstance(x, (int, float)) else (1, 0, str(x))


class CocoSource(DataSource):
    kind = "coco"

    def __init__(self, images_dir, annotations, n: int = DEFAULT_N, seed: int = DEFAULT_SEED,
                 captions: Optional[str] = None, exclude=None):
        self.n_requested, self.seed = _check_n(n), int(seed)
        # ids never drawn (e.g. an evaluation run's ids.json, for a disjoint calibration draw)
        self.exclude = None if exclude is None else {str(i) for i in exclude}
        self.images_dir, self.annotations = Path(images_dir), Path(annotations)
        self.captions_path = Path(captions) if captions else None
        coco = _read_json(self.annotations, "annotations file")
        if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "annotations", "categories")):
            raise DataError(f"annotations file {self.annotations} is not COCO instances JSON "
                            "(needs 'images', 'annotations' and 'categories' lists)")
        if not self.images_dir.is_dir():
            raise DataError(f"image folder not found: {self.images_dir}")
        try:
            cat_name = {c["id"]: str(c["name"]).lower() for c in coco["categories"]}
            files = {img["id"]: str(img["file_name"]) for img in coco["images"]}
            gts: dict[Any, set] = {i: set() for i in files}
            for a in coco["annotations"]:
                if a["image_id"] in gts and a["category_id"] in cat_name:
                    gts[a["image_id"]].add(cat_name[a["category_id"]])
        except (KeyError, TypeError) as e:
            raise DataError(f"annotations file {self.annotations} is not COCO instances JSON "
                            f"(an entry lacks {e})") from None
        if not files:
            raise DataError(f"annotations file {self.annotations} lists no images")
        self.categories = tuple(sorted(set(cat_name.values())))
        self.vocab = chair.vocabulary_for(self.categories)
        if self.captions_path is not None:
            self._add_caption_objects(gts)
        self._gts = gts
        all_ids = sorted(files, key=_id_sort_key)
        if self.exclude is not None:
            self.n_excluded = sum(str(i) in self.exclude for i in all_ids)
            all_ids = [i for i in all_ids if str(i) not in self.exclude]
            if not all_ids:
                raise DataError(f"annotations file {self.annotations} lists no images outside the excluded ids")
        order = np.random.default_rng(self.seed).permutation(len(all_ids))
        chosen = [all_ids[int(i)] for i in order[: self.n_requested]]
        self.n = len(chosen)
        self.n_available = len(all_ids)
        self.items = []
        missing = []
        for i in chosen:
            path = self._resolve(files[i])
            if path is None:
                missing.append(files[i])
                continue
            self.items.append(Item(i, tuple(sorted(gts[i])), (lambda p=str(path): p), os.path.abspath(path)))
        if missing:
            raise DataError(f"{len(missing)} of the {len(chosen)} chosen images are not in {self.images_dir} "
                            f"(first: {missing[0]})")

    def _resolve(self, file_name: str) -> Optional[Path]:
        for p in (self.images_dir / file_name, self.images_dir / Path(file_name).name):
            if p.is_file():
                return p
        return None

    def _add_caption_objects(self, gts: dict) -> None:
        caps = _read_json(self.captions_path, "captions file")
        try:
            for a in caps["annotations"]:
                if a["image_id"] in gts:
                    mentioned, _ = chair.caption_objects(str(a["caption"]), self.vocab)
                    gts[a["image_id"]].update(mentioned)
        except (KeyError, TypeError) as e:
            raise DataError(f"captions file {self.captions_path} is not COCO captions JSON "
                            f"(needs 'annotations' with 'image_id' and 'caption'; missing {e})") from None

    def pool_gts(self) -> list[tuple[str, ...]]:
        return [tuple(sorted(g)) for g in self._gts.values()]

    def describe(self) -> dict:
        return {"kind": "coco", "annotations": os.path.abspath(self.annotations),
                "images": os.path.abspath(self.images_dir),
                "captions": os.path.abspath(self.captions_path) if self.captions_path else None,
                "seed": self.seed, "n": self.n, "n_available": self.n_available,
                "vocabulary": self.vocab.name,
                **({"n_excluded": self.n_excluded} if self.exclude is not None else {})}


def write_ids(out_dir, source: DataSource) -> Path:
    """out_dir/ids.json = {"source": ..., "ids": [...]}; an existing one must list the same ids."""
    out = Path(out_dir)
    path = out / "ids.json"
    ids = source.ids
    if path.exists():
        try:
            old = json.loads(path.read_text())
            old_ids = old["ids"]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path} is not an ids file written by vhr-edge eval; use another --out") from None
        if old_ids != ids:
            raise DataError(f"{out} already holds a run on other images ({len(old_ids)} ids in ids.json, "
                            f"{len(ids)} now, or a different draw); use another --out")
        return path
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"source": source.describe(), "ids": ids}, indent=1))
    os.replace(tmp, path)
    return path


def add_data_args(p, captions: bool, counts: bool = True) -> None:
    """The data flags of `vhr-edge eval` (and of `vhr-edge trace`'s batch mode, which has its own
    -n / --seed: counts=False leaves them out)."""
    from ..testbed import SPLITS

    g = p.add_argument_group("data (testbed scenes, or COCO-format annotations + images)")
    g.add_argument("--testbed", choices=SPLITS, default=None,
                   help="testbed split rendered on the fly (default: counterfactual unless --images is given)")
    if counts:
        g.add_argument("--seed", type=int, default=DEFAULT_SEED,
                       help=f"testbed scene seed / COCO id draw seed / POPE sampling seed ({DEFAULT_SEED})")
        g.add_argument("-n", type=int, default=DEFAULT_N, help=f"number of images ({DEFAULT_N})")
    g.add_argument("--size", type=int, default=64, help="testbed render size in pixels (64)")
    g.add_argument("--images", metavar="DIR", help="folder of the COCO-format images")
    g.add_argument("--annotations", metavar="FILE", help="COCO instances JSON (e.g. instances_val2014.json)")
    if captions:
        g.add_argument("--captions", metavar="FILE",
                       help="COCO captions JSON: objects of the reference captions join the ground truth (as in CHAIR)")


def source_from_args(args, n: int, seed: int) -> DataSource:
    """The data source the flags of `add_data_args` name (validated before any model is loaded):
    COCO-format when --images or --annotations is given, else the testbed split (default
    counterfactual)."""
    if n < 1:
        raise DataError(f"-n must be at least 1, got {n}")
    if args.images is not None or args.annotations is not None:
        if args.testbed is not None:
            raise ConfigError("give either --testbed or --images/--annotations, not both")
        if args.images is None or args.annotations is None:
            raise ConfigError("COCO-format data needs both --images DIR and --annotations FILE")
        src = CocoSource(args.images, args.annotations, n=n, seed=seed, captions=getattr(args, "captions", None))
        if src.n < n:
            print(f"vhr-edge: note: {args.annotations} lists {src.n} images; evaluating all of them",
                  file=sys.stderr, flush=True)
        return src
    if getattr(args, "captions", None):
        raise ConfigError("--captions goes with --images/--annotations")
    return TestbedSource(args.testbed or "counterfactual", n=n, seed=seed, size=args.size)
