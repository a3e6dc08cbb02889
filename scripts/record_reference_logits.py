"""Records PyTorch transformers' logits of stories260k as a test fixture (run once; CI needs no torch).

Usage (needs `pip install torch==2.13.0`):

    python scripts/record_reference_logits.py [--data ../shared/data] [--out tests/fixtures/stories260k_logits.npz]

Input: the first 2 x 64 tokens of TinyStories validation (BOS id 1 prepended once to the stream),
as a batch of 2 rows of 64 tokens. Output npz: ``tokens`` int32 (2, 64), ``logits`` float32
(2, 64, 512) from `LlamaForCausalLM` in float32 on CPU, and the torch/transformers versions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument(
        "--out", type=Path, default=REPO / "tests" / "fixtures" / "stories260k_logits.npz"
    )
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=64)
    args = ap.parse_args()

    import torch
    import transformers
    from tokenizers import Tokenizer

    model_dir = args.data / "stories260k"
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = (args.data / "text" / "tinystories_valid.txt").read_text()
    n = args.batch * args.seqlen
    ids = [1] + tok.encode(text[:20000], add_special_tokens=False).ids
    if len(ids) < n:
        raise ValueError(f"text slice gives {len(ids)} tokens, need {n}")
    tokens = np.asarray(ids[:n], dtype=np.int64).reshape(args.batch, args.seqlen)

    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens)).logits.float().numpy()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        tokens=tokens.astype(np.int32),
        logits=logits.astype(np.float32),
        torch_version=np.asarray(torch.__version__),
        transformers_version=np.asarray(transformers.__version__),
    )
    print(
        f"wrote {args.out}: tokens {tokens.shape}, logits {logits.shape}, "
        f"{args.out.stat().st_size / 1024:.1f} KiB"
    )


if __name__ == "__main__":
    main()
