"""The oracle probe of issue 19: which single heads, reinforced, most lower the probability of
the hallucinated objects in the model's own greedy captions?

Teacher forcing in PyTorch (the engine returns logits of the first step only): the text model
is rebuilt in transformers from the GGUF (`oracle.load_hf_llama_from_gguf`, float32), the
image rows are libmtmd's own (`Runner.embed_image`), and the caption is the engine's greedy
caption. One batched forward pass holds the plain sequence and, for every (layer, head), the
same sequence with that head's attention output scaled by alpha at every position (an o_proj
pre-hook, exactly what VHR with that head forced does in the engine). For each object mention
(first token, eval/tvhd.mention_rows) the log-probability of its token is read; the probe
returns its change per (layer, head).

It looks at the answer on purpose (which mentions are hallucinated): it bounds what a head
selection rule could do, it is not a rule a user could run.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


class Prober:
    def __init__(self, session, gguf_path: str, prompt: str, threads: int = 1):
        import torch

        from ..oracle import load_hf_llama_from_gguf

        torch.set_num_threads(threads)
        self.torch = torch
        self.session, self.prompt = session, prompt
        self.model = load_hf_llama_from_gguf(gguf_path)
        cfg = self.model.config
        self.n_layer, self.n_head = cfg.num_hidden_layers, cfg.num_attention_heads
        self.n_embd = cfg.hidden_size
        self.hd = self.n_embd // self.n_head
        self.scales: Optional[list] = None  # per layer: [B, n_embd] or None
        for l, layer in enumerate(self.model.model.layers):
            layer.self_attn.o_proj.register_forward_pre_hook(self._hook(l))

    def _hook(self, layer):
        def pre(module, args):
            if self.scales is None or self.scales[layer] is None:
                return None
            return (args[0] * self.scales[layer][:, None, :],) + args[1:]

        return pre

    def embeds(self, rgb, tokens: Sequence[int]):
        """(inputs_embeds [1, L, d], index of the position that predicts tokens[0])."""
        torch = self.torch
        e = self.session._runner.embed_image(np.ascontiguousarray(rgb), self.prompt, self.session.prompt_template)
        emb = self.model.get_input_embeddings()
        with torch.no_grad():
            parts = [emb(torch.as_tensor(list(e["prefix"]), dtype=torch.long)),
                     torch.as_tensor(np.asarray(e["image"], np.float32)),
                     emb(torch.as_tensor(list(e["suffix"]), dtype=torch.long)),
                     emb(torch.as_tensor(list(tokens), dtype=torch.long))]
        first = len(e["prefix"]) + len(parts[1]) + len(e["suffix"]) - 1
        return torch.cat(parts)[None], first

    def single_head_logprobs(self, rgb, tokens: Sequence[int], targets: Sequence[int], alpha: float) -> dict:
        """Log-probabilities of tokens[t] for t in `targets` (teacher forced): "base" [T] plain and
        "heads" [n_layer, n_head, T] with one head scaled by alpha; "argmax_agree": the share of
        caption positions where the plain pass's argmax is the caption's token."""
        torch = self.torch
        x, first = self.embeds(rgb, tokens)
        n_rows = 1 + self.n_layer * self.n_head
        scales = [torch.ones(n_rows, self.n_embd) for _ in range(self.n_layer)]
        for l in range(self.n_layer):
            for h in range(self.n_head):
                scales[l][1 + l * self.n_head + h, h * self.hd:(h + 1) * self.hd] = alpha
        self.scales = scales
        try:
            with torch.no_grad():
                hid = self.model.model(inputs_embeds=x.expand(n_rows, -1, -1)).last_hidden_state
                pos = torch.as_tensor([first + t for t in range(len(tokens))])
                lp = torch.log_softmax(self.model.lm_head(hid[:, pos]).double(), dim=-1)  # [B, T_all, V]
        finally:
            self.scales = None
        tok = torch.as_tensor(list(tokens))
        agree = float((lp[0].argmax(-1) == tok).double().mean())
        idx = torch.as_tensor(list(targets), dtype=torch.long)
        picked = lp[:, idx, tok[idx]] if len(idx) else torch.zeros(n_rows, 0, dtype=torch.float64)
        return {"base": picked[0].numpy(), "heads": picked[1:].numpy().reshape(self.n_layer, self.n_head, -1),
                "argmax_agree": agree}


def oracle_heads(score: np.ndarray, layers: Sequence[int], count: int) -> dict[int, list[int]]:
    """Per layer of `layers`, the `count` heads with the most NEGATIVE score (score[l, h]: the
    change of the hallucinated log-probability, or a margin), only heads whose score is < 0;
    ties to the lower index. {layer: sorted heads}."""
    out = {}
    for l in layers:
        order = sorted(range(score.shape[1]), key=lambda h: (score[l, h], h))
        out[int(l)] = sorted(int(h) for h in order[:count] if score[l, h] < 0)
    return out


def random_like(heads: dict[int, list[int]], n_head: int, seed: int) -> dict[int, list[int]]:
    """The control of a fixed head set: as many heads per layer, drawn at random (seeded)."""
    rng = np.random.default_rng(seed)
    return {l: sorted(int(x) for x in rng.choice(n_head, size=len(h), replace=False)) for l, h in heads.items()}
