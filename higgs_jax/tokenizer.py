"""Tokenizer loading (HF ``tokenizer.json`` through the `tokenizers` library)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from higgs_jax.models.llama import LlamaConfig


def load_tokenizer(path: str | Path, config: LlamaConfig | None = None) -> Tokenizer:
    """Loads ``tokenizer.json`` from a file, a directory, or the directory of a ``.gguf`` file.

    Args:
        path: ``tokenizer.json``, a directory holding one, or a ``.gguf`` file whose directory holds one.
        config: If given, the tokenizer's vocabulary (incl. added tokens) must fit in
            ``config.vocab_size``.

    Raises:
        ValueError: when no ``tokenizer.json`` is found or its vocabulary exceeds the model's.
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        p = p.parent
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ValueError(f"no tokenizer.json at {path}")
    tok = Tokenizer.from_file(str(p))
    if config is not None:
        n = tok.get_vocab_size(with_added_tokens=True)
        if n > config.vocab_size:
            raise ValueError(
                f"tokenizer {p} has vocab size {n}, larger than the model's vocab_size="
                f"{config.vocab_size}: tokenizer and checkpoint do not match"
            )
    return tok
