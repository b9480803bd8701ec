"""Turn a training run into the bundled testbed: models/ files, metrics and the model card.

    python -m vhr_edge.testbed.release --run runs/testbed --models models [-n 200]

Writes into MODELS:
  testbed-hf/                 HF checkpoint (safetensors, f16) + tokenizer.model (the oracle's)
  testbed-f16.gguf            text model, exported from that f16 checkpoint
  testbed-q8_0.gguf, testbed-q4_k_m.gguf   quantized by llama.cpp (llama_model_quantize)
  testbed-mmproj-f16.gguf     vision tower + projector
  testbed_metrics.json        baseline (F16, greedy) and VHR numbers on held-out scenes
  loss_curves.png, train_log.json
The model card (models/README.md) is written from testbed_metrics.json by `card.py`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from ..export import export_llava
from ..fixtures import quantize
from ..templates import VICUNA_SYSTEM
from .card import shipped_files
from .evaluate import EVAL_SEED, evaluate

QUANTS = {"Q8_0": "testbed-q8_0.gguf", "Q4_K_M": "testbed-q4_k_m.gguf"}


def save_f16_checkpoint(run: Path, dst: Path) -> None:
    import torch
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(run / "hf", dtype=torch.float32)
    model.half().save_pretrained(dst, safe_serialization=True)
    shutil.copy(run / "tokenizer.model", dst / "tokenizer.model")


def export_models(run: Path, models: Path) -> dict[str, Path]:
    hf = models / "testbed-hf"
    save_f16_checkpoint(run, hf)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        text32, mmproj = export_llava(hf, tmp, name="testbed", tokenizer_model=hf / "tokenizer.model", prompt_template=VICUNA_SYSTEM,
                                      text_dtype="f32", mmproj_dtype="f16")
        out["F16"] = quantize(text32, models / "testbed-f16.gguf", "F16")
        for ftype, name in QUANTS.items():
            out[ftype] = quantize(text32, models / name, ftype)
        out["mmproj"] = Path(shutil.copy(mmproj, models / "testbed-mmproj-f16.gguf"))
    return out


def pope_f1(session, n: int) -> dict:
    """POPE (random / popular / adversarial, greedy, no VHR) on n scenes of each held-out split."""
    from ..eval.data import TestbedSource
    from ..eval.run import run_pope, session_answerer
    from ..session import GenerationConfig, VhrConfig

    answer = session_answerer(session, VhrConfig(enabled=False), GenerationConfig(n_predict=8))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for split in ("indist", "counterfactual"):
            r = run_pope(TestbedSource(split, n, EVAL_SEED), Path(tmp) / split, answer, progress=False)
            out[split] = {k: {m: round(v, 4) for m, v in r[k].items() if m in ("accuracy", "f1", "yes_ratio")}
                          for k in r}
    return out


def measure(models: Path, n: int, threads: int = 0) -> dict:
    from ..session import GenerationConfig, Session, VhrConfig

    gen = GenerationConfig(n_predict=96)
    mmproj = models / "testbed-mmproj-f16.gguf"
    res: dict = {"n": n, "eval_seed": EVAL_SEED, "max_tokens": gen.n_predict}
    for label, fname in (("F16", "testbed-f16.gguf"), *((k, v) for k, v in QUANTS.items())):
        s = Session(models / fname, mmproj, n_threads=threads)
        t0 = time.perf_counter()
        row = {
            "indist": evaluate(s, "indist", n, gen=gen, vhr=VhrConfig(enabled=False)),
            "counterfactual": evaluate(s, "counterfactual", n, gen=gen, vhr=VhrConfig(enabled=False)),
        }
        if label == "F16":
            row["pope"] = pope_f1(s, n // 2)
            for tag, v in (("vhr_a2", VhrConfig(alpha=2.0)), ("vhr_a3", VhrConfig(alpha=3.0)),
                           ("random_a2", VhrConfig(alpha=2.0, head_mode="random")),
                           ("random_a3", VhrConfig(alpha=3.0, head_mode="random"))):
                row[f"counterfactual_{tag}"] = evaluate(s, "counterfactual", n, gen=gen, vhr=v)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        res[label] = row
        print(label, json.dumps(row), flush=True)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/testbed"))
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("-n", type=int, default=200, help="scenes per evaluation")
    ap.add_argument("--skip-export", action="store_true")
    ap.add_argument("-t", "--threads", type=int, default=0, help="CPU threads per caption (default: all)")
    a = ap.parse_args(argv)
    a.models.mkdir(parents=True, exist_ok=True)
    if not a.skip_export:
        export_models(a.run, a.models)
        for f in ("loss_curves.png", "train_log.json"):
            shutil.copy(a.run / f, a.models / f)
    metrics = measure(a.models, a.n, a.threads)
    metrics["train"] = json.loads((a.models / "train_log.json").read_text())
    metrics["files"] = shipped_files(a.models)
    (a.models / "testbed_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"wrote {a.models / 'testbed_metrics.json'}")


if __name__ == "__main__":
    main()
