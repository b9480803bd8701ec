"""The testbed world: synthetic scenes with built-in habits, for a tiny LLaVA that hallucinates.

One purpose per module (numpy + Pillow only; nothing here imports torch):

- `world`    the vocabulary: categories, colours, contexts, habitual pairs and caption order
- `draw`     pictograms and context backgrounds drawn with Pillow
- `scenes`   `Scene`, the split samplers (unbiased / train / indist / counterfactual), `render`
- `captions` LLaVA-like detailed captions, POPE-style yes/no questions, the text corpus
- `coco`     ground truth in COCO instances format, and writing a split to disk

Quick look::

    import numpy as np
    from vhr_edge.testbed import scenes, captions
    s = scenes.make_split("train", 4, seed=0)
    scenes.render(s[0], size=128).show()
    print(captions.detailed_caption(s[0], np.random.default_rng(0)))
"""

SPLITS = ("unbiased", "train", "indist", "counterfactual")

__all__ = ["SPLITS"]
