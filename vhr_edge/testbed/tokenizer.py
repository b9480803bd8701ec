"""The testbed tokenizer: a LLaMA-style SentencePiece BPE model trained on the caption corpus.

Ids as in LLaMA: 0 <unk>, 1 <s>, 2 </s>, then 3 "<image>" (user-defined, for HF-style inputs),
byte fallback <0x00>..<0xFF>, then the learned pieces. Prompts are tokenized the way
llama.cpp/libmtmd does it: each text chunk around the image on its own, each with the
SentencePiece dummy space prefix, BOS only on the first.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
PREFIX = SYSTEM + " USER: "           # text before the image
SUFFIX = "\n{prompt} ASSISTANT:"      # text after the image
DETAIL_PROMPT = "Please describe this image in detail."


def train_tokenizer(lines: Iterable[str], out_path: Path, vocab_size: int = 1024) -> Path:
    """Train the SentencePiece model on `lines` and write it to out_path (a .model file)."""
    import sentencepiece as spm

    text = "\n".join([SYSTEM, PREFIX, SUFFIX.format(prompt=DETAIL_PROMPT), *lines])
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=["<image>"],
        remove_extra_whitespaces=False, normalization_rule_name="identity", num_threads=2,
        max_sentence_length=4096, minloglevel=2,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(buf.getvalue())
    return out_path


class Tokenizer:
    def __init__(self, model_path: Path):
        import sentencepiece as spm

        self.path = Path(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.bos, self.eos, self.image = 1, 2, self.sp.piece_to_id("<image>")
        assert self.sp.id_to_piece(1) == "<s>" and self.sp.id_to_piece(2) == "</s>" and self.image == 3

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i > 2])

    def prompt_parts(self, prompt: str = DETAIL_PROMPT) -> tuple[list[int], list[int]]:
        """(ids before the image incl. BOS, ids after it) exactly as libmtmd builds them."""
        return [self.bos] + self.encode(PREFIX), self.encode(SUFFIX.format(prompt=prompt))

    def answer(self, text: str) -> list[int]:
        """Target ids of an assistant answer, ending with EOS."""
        return self.encode(text) + [self.eos]
