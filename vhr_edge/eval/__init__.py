"""Hallucination evaluation: CHAIR and POPE over testbed or COCO-format data (issue 4).

- `chair`  object mentions in free text (80 COCO classes with synonyms/plurals, or the testbed
           vocabulary), the negation rule, CHAIR_S / CHAIR_I / recall / mean length
- `pope`   POPE question sets (random / popular / adversarial), yes/no parsing, metrics
- `data`   data sources: testbed scenes rendered on the fly, or COCO instances + image folder
- `run`    resumable runs (JSONL per caption / answer, summary JSON)
- `cli`    `vhr-edge eval chair|pope`

Nothing here imports the engine at module level: scoring works without a built extension.
"""

DEFAULT_N = 500  # images per evaluation (the paper's CHAIR setting)
DEFAULT_SEED = 1000  # testbed.evaluate.EVAL_SEED: a seed no training run uses
CHAIR_MAX_TOKENS = 512  # the paper's setting
POPE_MAX_TOKENS = 16
