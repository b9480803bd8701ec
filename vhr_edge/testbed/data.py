"""Training data of the testbed: rendered scenes as arrays, labels, and tokenized examples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import captions, world
from .scenes import Scene, make_split, render

CATEGORY_INDEX = {name: i for i, name in enumerate(world.NAMES)}
COLOUR_INDEX = {name: i for i, name in enumerate(world.COLOUR_NAMES)}
POSITION_INDEX = {name: i for i, name in enumerate(world.POSITIONS)}


def render_all(scenes: list[Scene], size: int = 64) -> np.ndarray:
    """N x size x size x 3 uint8."""
    out = np.empty((len(scenes), size, size, 3), np.uint8)
    for i, s in enumerate(scenes):
        out[i] = np.asarray(render(s, size), np.uint8)
    return out


@dataclass
class VisionLabels:
    present: np.ndarray  # N x C float {0,1}
    colour: np.ndarray  # N x C int (-1 = absent)
    position: np.ndarray  # N x C int (-1 = absent)


def vision_labels(scenes: list[Scene]) -> VisionLabels:
    n, c = len(scenes), len(world.NAMES)
    present = np.zeros((n, c), np.float32)
    colour = np.full((n, c), -1, np.int64)
    position = np.full((n, c), -1, np.int64)
    for i, s in enumerate(scenes):
        for o in s.objects:
            k = CATEGORY_INDEX[o.category]
            present[i, k] = 1.0
            colour[i, k] = COLOUR_INDEX[o.colour]
            position[i, k] = POSITION_INDEX[o.position]
    return VisionLabels(present, colour, position)


@dataclass
class Example:
    scene: int  # index into the image array
    prompt: list[int]  # tokens after the image (instruction + "ASSISTANT:")
    answer: list[int]  # target tokens, ending with EOS


def examples(scenes: list[Scene], tok, n_questions: int = 2, salt: int = 0) -> tuple[list[Example], list[Example]]:
    """(caption examples, yes/no examples): one detailed caption and n_questions QA per scene."""
    caps, qas = [], []
    _, detail = tok.prompt_parts()
    for i, s in enumerate(scenes):
        rng = captions.rng_for(s, salt)
        caps.append(Example(i, detail, tok.answer(captions.detailed_caption(s, rng))))
        for q, a in captions.questions(s, rng, n_questions):
            qas.append(Example(i, tok.prompt_parts(q)[1], tok.answer(a)))
    return caps, qas


def corpus_lines(scenes: list[Scene], salt: int = 0) -> list[str]:
    return captions.training_corpus(scenes, salt=salt).splitlines()


def splits(n_unbiased: int, n_train: int, seed: int) -> dict[str, list[Scene]]:
    return {"unbiased": make_split("unbiased", n_unbiased, seed), "train": make_split("train", n_train, seed)}


def pad_batch(seqs: list[list[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids and a 0/1 mask."""
    n = max(len(s) for s in seqs)
    ids = np.full((len(seqs), n), pad, np.int64)
    mask = np.zeros((len(seqs), n), np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask
