"""How well the testbed model sees, and how much it hallucinates (numbers for the model card).

    python -m vhr_edge.testbed.evaluate -m MODEL.gguf --mmproj MMPROJ.gguf --split counterfactual -n 200
        [--seed 1000] [--no-vhr | --alpha A] [--random-heads] [--out DIR]
    python -m vhr_edge.testbed.evaluate --hf RUN_DIR [--device cuda] ...   # a training run, before export

`--hf` scores greedy captions of a training run's HF checkpoint (RUN_DIR/hf, RUN_DIR/tokenizer.model)
with transformers, batched, without VHR: for comparing training recipes on any torch device.

Per split, over greedy captions of "Please describe this image in detail." (exact ground truth):
- recall          mentioned ground-truth objects / ground-truth objects
- colour_acc      mentioned ground-truth objects whose colour word is right / those mentioned
- chair_s         captions with at least one hallucinated object / captions
- chair_i         hallucinated object mentions / all object mentions (distinct per caption)
                  (mentions are found by vhr_edge.eval.chair: negated ones, "no knife", do not count)
- partner_share   hallucinated objects that are a missing habitual partner of a present object
- mean_len        words per caption
"""

from __future__ import annotations

import argparse
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import captions as cap
from .scenes import Scene, make_split, render

EVAL_SEED = 1000  # evaluation scenes: a seed no training run uses


@dataclass
class CaptionScore:
    n_gt: int
    hit: int
    colour_ok: int
    mentioned: list[str]
    hallucinated: list[str]
    partners: int  # hallucinated objects that are missing partners
    words: int


def score_caption(scene: Scene, text: str) -> CaptionScore:
    from ..eval.chair import caption_objects, testbed_vocabulary

    gt = {o.category: o for o in scene.objects}
    parsed = cap.parse_caption(text)
    mentioned, _ = caption_objects(text, testbed_vocabulary())  # the CHAIR core (negation rule)
    colour_of = {}
    for p in parsed:  # first mention of each category decides its colour
        colour_of.setdefault(p["category"], p["colour"])
    hit = [c for c in mentioned if c in gt]
    hallucinated = [c for c in mentioned if c not in gt]
    missing = set(scene.missing_partners)
    return CaptionScore(
        n_gt=len(gt), hit=len(hit), colour_ok=sum(colour_of.get(c) == gt[c].colour for c in hit),
        mentioned=mentioned, hallucinated=hallucinated, partners=sum(c in missing for c in hallucinated),
        words=len(text.split()),
    )


def summarize(scores: list[CaptionScore]) -> dict:
    n_gt = sum(s.n_gt for s in scores)
    hit = sum(s.hit for s in scores)
    mentions = sum(len(s.mentioned) for s in scores)
    hall = sum(len(s.hallucinated) for s in scores)
    return {
        "n": len(scores),
        "recall": round(hit / max(1, n_gt), 4),
        "colour_acc": round(sum(s.colour_ok for s in scores) / max(1, hit), 4),
        "chair_s": round(sum(bool(s.hallucinated) for s in scores) / max(1, len(scores)), 4),
        "chair_i": round(hall / max(1, mentions), 4),
        "partner_share": round(sum(s.partners for s in scores) / max(1, hall), 4),
        "mean_len": round(float(np.mean([s.words for s in scores])) if scores else 0.0, 2),
    }


def evaluate(session, split: str, n: int, seed: int = EVAL_SEED, *, vhr=None, gen=None, out_jsonl=None,
             progress: bool = True) -> dict:
    from ..session import GenerationConfig, VhrConfig

    vhr = vhr or VhrConfig()
    gen = gen or GenerationConfig(n_predict=96)
    scenes = make_split(split, n, seed)
    scores = []
    it = scenes
    if progress:
        try:
            from tqdm import tqdm

            it = tqdm(scenes, desc=f"{split}", unit="img", leave=False)
        except ImportError:
            pass
    f = open(out_jsonl, "w") if out_jsonl else None
    try:
        for s in it:
            r = session.caption(np.asarray(render(s)), cap.DETAIL_PROMPT, vhr=vhr, gen=gen)
            sc = score_caption(s, r.text)
            scores.append(sc)
            if f:
                f.write(json.dumps({"image_id": s.id, "caption": r.text, "gt_objects": sorted(o.category for o in s.objects),
                                    "mentioned": sc.mentioned, "hallucinated": sc.hallucinated}) + "\n")
    finally:
        if f:
            f.close()
    return summarize(scores)


def hf_captions(run_dir: Path, scenes: list[Scene], *, device: str = "cpu", max_tokens: int = 96,
                batch: int = 200) -> list[str]:
    """Greedy detailed captions of `scenes` by an HF checkpoint (float32, KV cache, no VHR).

    run_dir: a training run (RUN_DIR/hf, RUN_DIR/tokenizer.model) or a checkpoint folder that
    holds its tokenizer.model (models/testbed-hf).
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    from .model import image_features, image_tensor, language_model
    from .tokenizer import Tokenizer

    run_dir = Path(run_dir)
    ckpt = run_dir / "hf" if (run_dir / "hf").is_dir() else run_dir
    tok = Tokenizer(run_dir / "tokenizer.model" if (run_dir / "tokenizer.model").is_file() else ckpt / "tokenizer.model")
    model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).to(device).eval()
    body, head = language_model(model)
    prefix, suffix = (torch.tensor(t, device=device) for t in tok.prompt_parts())
    # transformers 5 renamed past_key_values to cache (kwarg and output field)
    key = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    texts = []
    with torch.no_grad():
        for i in range(0, len(scenes), batch):
            px = image_tensor(np.stack([np.asarray(render(s)) for s in scenes[i:i + batch]])).to(device)
            img = image_features(model, px)
            B = img.shape[0]
            x = torch.cat([body.embed_tokens(prefix).expand(B, -1, -1), img,
                           body.embed_tokens(suffix).expand(B, -1, -1)], dim=1)
            out = body(inputs_embeds=x, use_cache=True)
            nxt = head(out.last_hidden_state[:, -1]).argmax(-1)
            done, ids = nxt == tok.eos, [nxt]
            while len(ids) < max_tokens and not bool(done.all()):
                out = body(inputs_embeds=body.embed_tokens(nxt[:, None]), use_cache=True, **{key: getattr(out, key)})
                nxt = torch.where(done, tok.eos, head(out.last_hidden_state[:, -1]).argmax(-1))
                done |= nxt == tok.eos
                ids.append(nxt)
            for row in torch.stack(ids, 1).tolist():
                texts.append(tok.decode(row[: row.index(tok.eos)] if tok.eos in row else row))
    return texts


def main(argv=None) -> None:
    from ..session import GenerationConfig, Session, VhrConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model")
    ap.add_argument("--mmproj")
    ap.add_argument("--hf", type=Path, metavar="RUN_DIR", help="score a training run's HF checkpoint instead (no VHR)")
    ap.add_argument("--device", default="cpu", help="torch device for --hf (default %(default)s)")
    ap.add_argument("--split", default="counterfactual", choices=["indist", "counterfactual", "train", "unbiased"])
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--no-vhr", action="store_true")
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--layers", default="auto")
    ap.add_argument("--random-heads", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.hf:
        scenes = make_split(a.split, a.n, a.seed)
        texts = hf_captions(a.hf, scenes, device=a.device, max_tokens=a.max_tokens)
        print(json.dumps({"split": a.split, **summarize([score_caption(s, t) for s, t in zip(scenes, texts)])}))
        return
    if not (a.model and a.mmproj):
        ap.error("-m/--model and --mmproj are required (or --hf RUN_DIR)")
    s = Session(a.model, a.mmproj)
    vhr = VhrConfig(enabled=not a.no_vhr, alpha=a.alpha, layers=a.layers, head_mode="random" if a.random_heads else "vhd")
    jsonl = None
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        tag = "greedy" if a.no_vhr else f"vhr-a{a.alpha:g}" + ("-random" if a.random_heads else "")
        jsonl = a.out / f"{a.split}-{tag}.jsonl"
    res = evaluate(s, a.split, a.n, a.seed, vhr=vhr, gen=GenerationConfig(n_predict=a.max_tokens), out_jsonl=jsonl)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
