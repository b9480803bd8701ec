"""Write models/README.md (the testbed's model card) from models/testbed_metrics.json.

    python -m vhr_edge.testbed.card [--models models]   # also refreshes the file list in the metrics
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGETS = {  # issue 3: what the testbed must do (F16, greedy, 200 scenes each)
    ("indist", "recall"): (">=", 0.9),
    ("indist", "colour_acc"): (">=", 0.8),
    ("counterfactual", "recall"): (">=", 0.8),
    ("counterfactual", "chair_i"): (">=", 0.10),
}


def _row(name: str, m: dict) -> str:
    return (f"| {name} | {m['recall']:.3f} | {m['colour_acc']:.3f} | {m['chair_s']:.3f} | {m['chair_i']:.3f} "
            f"| {m['partner_share']:.3f} | {m['mean_len']:.1f} |")


HEADER = ("| | recall | colour acc | CHAIR_S | CHAIR_I | missing-partner share | words |\n"
          "|---|---|---|---|---|---|---|")


HISTORY = [  # (release, what it was / what changed)
    ("v0", ["first release, 1400 joint steps x 24 in float32, 70.8 min: in-distribution recall 0.961 but",
            "colour accuracy 0.416; counterfactual recall 0.615, CHAIR_I 0.407; POPE answers were always",
            "\"Yes.\". Its captions said \"a red fork\": the decoder had to give the colour of an object it",
            "had not named yet, and teacher-forced it got the colour right in 0.47 of the slots, 76% of its",
            "misses being the colour of ANOTHER object in the scene (the tower alone reads colour at 0.999)."]),
    ("v1", ["captions name the object first (\"a fork in red\"); the decoder stages run under bfloat16",
            "autocast (about 1.5x faster on these CPUs, so the joint stage could be twice as long); projector",
            "LR 2e-3 for 400 steps; joint LR 5e-4 for 2800 steps; 30% yes/no questions; 77.9 min.",
            "In-distribution recall 0.970, colour accuracy 0.976; counterfactual recall 0.767, CHAIR_I 0.254.",
            "POPE at chance (accuracy 0.50 / 0.51): a yes/no answer's loss was averaged over \"Yes\", \".\"",
            "and EOS, it ended at ln(2)/3 (chance), and teacher-forced P(yes) was 0.503 whether or not the",
            "object was there."]),
    ("v2", ["a yes/no answer's loss on its Yes/No token only (the average over three tokens had cut the",
            "decision's gradient to a third); stage 5: 600 more steps with 60% yes/no questions, captions",
            "still in the mix, LR x0.6; joint stage 3200 steps; the vision stage under bfloat16 too (1.7x",
            "faster per step, same tower check); 83.0 min. POPE now depends on the image (yes ratio",
            "0.49 / 0.51), and co-occurring absent objects draw the most false yeses (counterfactual",
            "adversarial F1 0.715 vs random 0.832), as in LLaVA. Shipped over v1 for that, at a cost:",
            "counterfactual recall 0.767 -> 0.744 and",
            "counterfactual colour accuracy 0.927 -> 0.775; the same three targets are met."]),
    ("v3", ["5% of the stage 4-5 batches come from the unbiased scenes (objects uniform, pairs at chance),",
            "the stand-in for the atypical images in LLaVA's data; all else as v2; 85.5 min. The share was",
            "picked by a pilot on one H200 (`--device cuda`, scored with `evaluate --hf`, one run per",
            "share; counterfactual recall / CHAIR_I): 0 -> 0.752 / 0.265, 0.1 -> 0.911 / 0.111,",
            "0.2 -> 0.924 / 0.108 (seed 1: 0.919 / 0.083), 0.35 -> 0.929 / 0.085. 0.05 was chosen to",
            "keep CHAIR_I clear of 0.10; it was not piloted. Against v2: counterfactual recall",
            "0.744 -> 0.861, CHAIR_I 0.285 -> 0.152, colour accuracy 0.775 -> 0.947; all four targets met."]),
]


def release_name(plan: dict) -> str:
    """Which testbed release a training plan made (v2 added stage 5's question mix, v3 unbiased batches)."""
    if plan.get("unbiased_share", 0) > 0:
        return "v3"
    return "v2" if "qa_share_late" in plan else "v1"


def history(current: str) -> list[str]:
    lines = ["History:", ""]
    for name, text in HISTORY:
        lines.append(f"- {name}{' (this one)' if name == current else ''}: {text[0]}")
        lines += [f"  {t}" for t in text[1:]]
        if name == current:
            break
    return lines


def render_card(m: dict) -> str:
    t = m["train"]
    plan, secs = t["plan"], t.get("seconds", {})
    all_bf16 = plan.get("bf16") and "qa_share_late" in plan  # before v2 (no stage-5 mix) the vision stage was f32
    f16 = m["F16"]
    vc = t.get("vision_check", {})
    lines = [
        "# The vhr-edge testbed: a tiny LLaVA that hallucinates like a big one",
        "",
        "A real, trained `LlavaForConditionalGeneration` made by this project, offline, on its own",
        "synthetic scenes (`vhr_edge/testbed/`). Its job: be a model organism of object hallucination",
        "with exact ground truth, the default model of `vhr-edge`, and an oracle target for the engine.",
        "",
        "## What it is",
        "",
        "- Vision: SigLIP-style ViT (no class token), 64x64 input, 8x8 patches -> 64 image tokens,",
        "  5 blocks of width 192; features from layer -2 (all patches).",
        "  No CLS because llama.cpp at llama-cpp-python 0.3.36 mis-orders LLaVA's CLS token",
        "  (ggml-org/llama.cpp #25814): a CLS-free tower is computed identically by HF and libmtmd.",
        "- Projector: LLaVA-1.5 MLP (Linear, GELU-tanh, Linear) to width 256.",
        "- Decoder: LLaMA, 8 layers, 8 heads of 32, n_embd 256, n_ff 768, SentencePiece BPE vocabulary",
        "  of 1024 trained on the captions. Default prompt template: LLaVA-1.5 (vicuna).",
        "- Captions: 20-40 words, every object with its colour and coarse position in the habitual",
        "  order (\"There is a fork in red at the top left and a knife in blue on the right.\").",
        "",
        "## How it was made",
        "",
        "```bash",
        f"python -m vhr_edge.testbed.train --out runs/testbed --seed {plan['seed']}   # ~{t.get('minutes', '?')} min on 2 cores",
        "python -m vhr_edge.testbed.release --run runs/testbed --models models",
        "python -m vhr_edge.testbed.card --models models",
        "```",
        "",
        "`--device cuda` trains on a GPU (five runs sharing one H200 took 6.6 min each); GPU and CPU",
        "runs of the same seed see the same data and batches but are not bit-identical.",
        "`python -m vhr_edge.testbed.evaluate --hf runs/testbed --split counterfactual [--device cuda]`",
        "scores a run's checkpoint before export (it gives the F16 GGUF's numbers to 3 decimals on v2).",
        "",
        "Stages, like LLaVA-1.5 (loss curves: `loss_curves.png`):",
        "",
        f"1. vision tower alone on {plan['n_unbiased']} UNBIASED scenes (objects uniform, no habits): presence,",
        f"   per-object colour and position heads; {plan['vision_steps']} steps x {plan['vision_batch']} ({secs.get('vision', '?')} s).",
        f"   Check on counterfactual scenes: presence F1 {vc.get('presence_f1', '?')}, colour accuracy "
        f"{vc.get('colour_acc', '?')}, position accuracy {vc.get('position_acc', '?')}.",
        f"2. decoder alone as a text LM on the habit-laden captions of {plan['n_train']} train scenes; "
        f"{plan['lm_steps']} steps ({secs.get('lm', '?')} s).",
        f"3. projector alone on image-caption pairs; {plan['proj_steps']} steps ({secs.get('proj', '?')} s).",
        f"4. projector + decoder on captions ({1 - plan['qa_share']:.0%}) and yes/no questions; "
        f"{plan['joint_steps']} steps x {plan['batch']} ({secs.get('joint', '?')} s). Vision frozen."
        + (f" {plan['unbiased_share']:.0%} of the batches (here and in stage 5) come from the unbiased scenes:"
           " the stand-in for the atypical images in LLaVA's instruction data; the rest are habit-laden."
           if plan.get("unbiased_share") else "")
        + (" Stages 2-4 under bfloat16 autocast." if plan.get("bf16") and not all_bf16 else ""),
        *([f"5. the same at LR x0.6 with {plan.get('qa_share_late', 0):.0%} yes/no questions; {plan['qa_steps']} steps x "
           f"{plan['batch']} ({secs.get('qa', '?')} s)."] if plan.get("qa_steps") else []),
        *(["", "Every stage runs under bfloat16 autocast. A yes/no answer's loss is taken on its Yes/No token only."]
          if all_bf16 else []),
        *([f"Yes/No decision loss over the last 100 question batches: {t['joint_qa_loss_last100']} after stage 4, "
           f"{t['qa_stage_qa_loss_last100']} after stage 5 (chance: ln 2 = 0.693)."]
          if t.get("qa_stage_qa_loss_last100") is not None else []),
        "",
        "## Files",
        "",
        "| file | bytes |",
        "|---|---|",
        *[f"| `{k}` | {v:,} |" for k, v in m["files"].items() if not k.startswith(".")],
        "",
        f"## Its numbers (greedy, \"{'Please describe this image in detail.'}\", {m['n']} held-out scenes per split, "
        f"seed {m['eval_seed']}, at most {m['max_tokens']} tokens)",
        "",
        "Recall = mentioned ground-truth objects / ground-truth objects; colour accuracy over the",
        "mentioned ones; CHAIR_S = captions with a hallucinated object; CHAIR_I = hallucinated /",
        "mentioned objects; missing-partner share = hallucinations that are the absent habitual",
        "partner of a present object (fork -> knife).",
        "",
        HEADER,
    ]
    for q in ("F16", "Q8_0", "Q4_K_M"):
        if q in m:
            lines.append(_row(f"{q} in-distribution", m[q]["indist"]))
            lines.append(_row(f"{q} counterfactual", m[q]["counterfactual"]))
    if "pope" in f16:
        lines += ["", "POPE (F16, greedy, \"Is there a {object} in the image?\", 3 positive + 3 negative questions",
                  f"per scene on {m['n'] // 2} scenes per split; negatives random / frequent / co-occurring):", "",
                  "| split | random F1 | popular F1 | adversarial F1 | yes ratio (avg) |", "|---|---|---|---|---|"]
        for split, r in f16["pope"].items():
            lines.append(f"| {split} | {r['random']['f1']:.3f} | {r['popular']['f1']:.3f} | "
                         f"{r['adversarial']['f1']:.3f} | {r['average']['yes_ratio']:.2f} |")
    lines += ["", "Targets (issue 3; the world and the model were frozen on these baseline numbers only):", ""]
    missed = []
    for (split, key), (op, val) in TARGETS.items():
        got = f16[split][key]
        ok = got >= val if op == ">=" else got <= val
        lines.append(f"- {split} {key} {op} {val}: {got:.3f} {'met' if ok else 'NOT met'}")
        if not ok:
            missed.append(f"{split} {key}")
    lines += ["", f"Status: misses {', '.join(missed)}." if missed else "Status: all four targets met."]
    pope_acc = [r["average"]["accuracy"] for r in f16.get("pope", {}).values()]
    if pope_acc and max(pope_acc) < 0.6:
        lines += ["", f"POPE is at chance (accuracy {', '.join(f'{a:.2f}' for a in pope_acc)}): the yes/no answers do",
                  "not depend on the image, so POPE numbers from this model measure its yes-bias, not",
                  "hallucination. Captions do see the objects: the question-to-image lookup never formed."]
    lines += ["", *history(release_name(plan))]
    lines += [
        "",
        "## VHR on it (F16, counterfactual split), reported as it came, never tuned on",
        "",
        HEADER,
        _row("greedy", f16["counterfactual"]),
    ]
    for tag, name in (("vhr_a2", "VHR alpha 2"), ("vhr_a3", "VHR alpha 3"),
                      ("random_a2", "random heads alpha 2 (control)"), ("random_a3", "random heads alpha 3 (control)")):
        key = f"counterfactual_{tag}"
        if key in f16:
            lines.append(_row(name, f16[key]))
    lines += [
        "",
        "Layers: `auto` (layer 1 + the last round(14 * 8 / 32) = 4: {1, 4, 5, 6, 7}). The random-heads",
        "control reinforces as many heads per layer as VHR would, chosen at random. VHR here is the",
        "released method (VHR_SPEC 1-5: a separate, unscaled, cached text-only reference); the",
        "held-out ablation with 95% intervals, and the earlier joint variant, are in docs/results.md.",
        "",
    ]
    if m.get("mechanism"):
        lines += mechanism_lines(m["mechanism"])
    return "\n".join(lines)


def mechanism_lines(mech: dict) -> list[str]:
    """Issue 19's answer on this model (docs/mechanism.md), from the study's block."""
    lines = ["## Does VHR's mechanism exist here? (issue 19; `docs/mechanism.md`)", "",
             "T-VHD (VHR_SPEC 6, top-8 of 8 heads, every layer) of each object mention's first token in the",
             "model's own greedy captions, 200 scenes per split, seed 1000. AUROC = P(T-VHD of a real object",
             "> that of a hallucinated one); above 0.5 is the paper's claim (95% interval: captions resampled):", "",
             "| file | split | real / hallucinated mentions | AUROC [95% CI] |", "|---|---|---|---|"]
    for r in mech.get("tvhd", []):
        lines.append(f"| {r['file']} | {r['split']} | {r['n_real']} / {r['n_hall']} | "
                     f"{r['auroc']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] |")
    above = [f"{r['file']} {r['split']}" for r in mech.get("tvhd", []) if r["ci"][0] > 0.5]
    rest = [f"{r['file']} {r['split']}" for r in mech.get("tvhd", []) if not r["ci"][0] > 0.5]
    if mech.get("tvhd"):
        lines += ["", f"Hallucinated objects have the lower T-VHD, with the interval above 0.5, on: "
                  f"{', '.join(above) or 'none'}" + (f"; the interval reaches 0.5 on: {', '.join(rest)}." if rest else ".")]
    ho = mech.get("heldout") or {}
    rows = ho.get("rows", [])
    if rows and ho.get("greedy"):
        g = ho["greedy"]
        lines += ["", f"Head reinforcement on held-out scenes ({ho['split']}; greedy CHAIR_S {g['chair_s']:.3f}, "
                  f"recall {g['recall']:.3f}):", "",
                  "| setting | CHAIR_S | recall | CHAIR_S - greedy [paired 95% CI] | - its random heads [95% CI] |",
                  "|---|---|---|---|---|"]
        for r in rows:
            vr = r.get("d_vs_random_ci")
            lines.append(f"| {r['name']} | {r['chair_s']:.3f} | {r['recall']:.3f} | {r['d_chair_s']:+.3f} "
                         f"[{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | "
                         + ("" if vr is None else f"[{vr[0]:+.3f}, {vr[1]:+.3f}]") + " |")
        beats = [r["name"] for r in rows if r["ci"][1] < 0]
        fair = [r["name"] for r in rows if r["ci"][1] < 0 and not r["name"].endswith("per-image")]
        lines.append("")
        if not fair:
            lines += ["**This testbed cannot show VHR's effect.** No head-reinforcement setting found on the",
                      "calibration scenes, not even heads picked by an oracle that looked at the calibration",
                      "answers, lowered CHAIR_S beyond the interval of plain greedy decoding on held-out scenes.",
                      "The testbed stays a correctness and tooling model (the engine against its PyTorch",
                      "oracle, quantization, the evaluation tools), not evidence for or against VHR."]
            if beats:
                lines.append(f"Only the per-image oracle ({', '.join(beats)}), which reads each held-out caption's own "
                             "hallucinations, gets below greedy; see the document for its random-heads control.")
        else:
            lines += [f"Settings below greedy beyond the interval: {', '.join(fair)}; how far VHR's own rule is",
                      "from them, and which heads and layers matter, is in the document."]
    return lines + [""]


def shipped_files(models: Path) -> dict:
    """Every file in MODELS with its size, except the card and the metrics themselves."""
    return {str(p.relative_to(models)): p.stat().st_size for p in sorted(models.rglob("*"))
            if p.is_file() and p.name not in ("README.md", "testbed_metrics.json")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", type=Path, default=Path("models"))
    a = ap.parse_args(argv)
    path = a.models / "testbed_metrics.json"
    m = json.loads(path.read_text())
    m["files"] = shipped_files(a.models)  # profiles written after the release are listed too
    path.write_text(json.dumps(m, indent=1))
    (a.models / "README.md").write_text(render_card(m))
    print(f"wrote {a.models / 'README.md'}")


if __name__ == "__main__":
    main()
