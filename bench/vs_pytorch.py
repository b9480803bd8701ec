"""vhr-edge VHR vs the PyTorch reference VHR (vhr_edge.oracle) on the same testbed weights.

    python bench/vs_pytorch.py [--runs 5] [--tokens 32] [--threads 2] [-tb N] [-m models/testbed-q8_0.gguf]
    python bench/vs_pytorch.py --device cuda -ngl -1     # both on the GPU (reference in float16)

Same image, same prompt, same number of generated tokens (EOS ignored on both sides), the
engine on models/testbed-f16.gguf (or -m: a quantization of the same weights), the reference on models/testbed-hf (f16 weights in float32,
HF tower + projector for the image rows, o_proj pre-hooks for VHR). Both use `--threads`
threads (the engine can decode on fewer with -t, keeping -tb for its prefill). Runs alternate after a warm-up; prints medians and the ratio, goal >= 10x faster.
--device cuda puts the reference on the GPU (default dtype float16 there, --dtype to change) and
-ngl the engine's layers (and its vision projector) on the GPU of a CUDA build of llama-cpp-python.
Needs the oracle extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads of both sides (the engine's decode threads)")
    ap.add_argument("-tb", "--threads-batch", type=int, default=0,
                    help="the engine's prefill / encoder threads (default: as --threads)")
    ap.add_argument("-m", "--model", type=Path, default=MODELS / "testbed-f16.gguf",
                    help="the engine's text GGUF (default: the F16 export of the reference's weights)")
    ap.add_argument("--device", default="cpu", help="the reference's torch device: cpu (default), cuda, cuda:1 ...")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="the reference's dtype (default: float32 on cpu, float16 on cuda)")
    ap.add_argument("-ngl", "--n-gpu-layers", dest="n_gpu_layers", type=int, default=0,
                    help="the engine's layers on the GPU (-1 = all; needs a GPU build of llama-cpp-python)")
    a = ap.parse_args()

    import torch
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    from vhr_edge import DEFAULT_PROMPT, Session
    from vhr_edge.oracle import vhr_reference
    from vhr_edge.testbed.model import image_features, image_tensor
    from vhr_edge.testbed.scenes import make_split, render

    torch.set_num_threads(max(a.threads, a.threads_batch))  # never fewer than the engine's
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("float32" if dev.type == "cpu" else "float16"))
    llava = LlavaForConditionalGeneration.from_pretrained(MODELS / "testbed-hf", dtype=torch.float32).eval()
    lm = LlamaForCausalLM(llava.config.text_config).eval()
    lm.model.load_state_dict(llava.model.language_model.state_dict())
    lm.lm_head.load_state_dict(llava.lm_head.state_dict())
    llava, lm = llava.to(dev, dtype), lm.to(dev, dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    session = Session(a.model, MODELS / "testbed-mmproj-f16.gguf", n_threads=a.threads,
                      n_threads_batch=a.threads_batch, n_gpu_layers=a.n_gpu_layers)
    img = np.asarray(render(make_split("counterfactual", 1, 4321)[0]))
    parts = session._runner.embed_image(img, DEFAULT_PROMPT, session.prompt_template)
    layers = session.caption(img, n_predict=1).vhr.layers

    def engine() -> float:
        t0 = time.perf_counter()
        session.caption(img, n_predict=a.tokens, ignore_eos=True)
        return time.perf_counter() - t0

    def reference() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            rows = image_features(llava, image_tensor(img[None]).to(dev, dtype))[0].float().cpu().numpy()
        out = vhr_reference(lm, parts["prefix"], rows, parts["suffix"], layers=layers, alpha=2.0,
                            n_predict=a.tokens, eos_id=-1)
        sync()
        assert len(out["tokens"]) == a.tokens
        return time.perf_counter() - t0

    engine(), reference()  # warm-up
    e, r = [], []
    for _ in range(a.runs):
        e.append(engine())
        r.append(reference())
    me, mr = statistics.median(e), statistics.median(r)
    ratio = statistics.median(y / x for x, y in zip(e, r))
    tb = a.threads_batch or a.threads
    ngl = f", -ngl {a.n_gpu_layers}" if a.n_gpu_layers else ""
    print(f"per caption ({a.tokens} tokens, VHR alpha 2, layers {layers}, {a.threads} threads"
          + (f", engine prefill {tb}" if tb != a.threads else "") + "):")
    print(f"  {'vhr-edge (llama.cpp, ' + a.model.name + ngl + ')':<44} {me * 1000:8.1f} ms")
    print(f"  {f'PyTorch reference (HF, {dtype_name(dtype)}, {dev})':<44} {mr * 1000:8.1f} ms")
    print(f"  speed-up {ratio:.1f}x  {'PASS' if ratio >= 10 else 'MISS'} (>= 10x)")
    print(json.dumps({"engine_ms": round(me * 1000, 1), "pytorch_ms": round(mr * 1000, 1), "speedup": round(ratio, 2),
                      "device": str(dev), "dtype": dtype_name(dtype), "n_gpu_layers": a.n_gpu_layers}))


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


if __name__ == "__main__":
    main()
