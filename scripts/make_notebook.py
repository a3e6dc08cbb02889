"""Builds `colab/quickstart.ipynb` from the cells below (outputs empty), so the notebook is reproducible.

Usage:
    python scripts/make_notebook.py            # writes colab/quickstart.ipynb
    python scripts/make_notebook.py --check    # exits 1 if the committed notebook is out of date

Edit the cells here, not in the .ipynb.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "colab" / "quickstart.ipynb"

CELLS: list[tuple[str, str]] = [
    (
        "md",
        """\
# higgs-jax quickstart: HIGGS weight quantization of a real Llama, in JAX

HIGGS quantizes a weight matrix data-free: rotate each column in blocks of `h` with a Hadamard
transform (which makes the entries close to Gaussian), scale every block to unit RMS, and round
consecutive `p`-vectors to an MSE-optimal grid for the Gaussian. Quantized weights are
`HiggsTensor` pytree leaves, so a quantized params tree goes through `jit`, `tree_map`,
`device_put` and orbax like any other tree, and the same model function runs both.

This notebook uses the tiny real Llama embedded in the package (stories260k: 5 layers,
hidden 64, MLP width 172, vocab 512) and a slice of TinyStories, so it needs no download and
runs in about a minute on a CPU. Every step works the same on any Llama-family HF directory or
GGUF file passed to `load_checkpoint`.""",
    ),
    (
        "code",
        """\
# Install: only in Colab. Elsewhere, run from an environment where higgs-jax is installed
# (`pip install -e .` in the repo) or on PYTHONPATH.
import sys

IN_COLAB = "google.colab" in sys.modules
REPO_URL = "https://github.com/<owner>/higgs-jax"  # placeholder: the repository to install from
if IN_COLAB:
    import subprocess

    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", f"git+{REPO_URL}"])""",
    ),
    (
        "code",
        """\
import time

import jax
import jax.numpy as jnp
import numpy as np

import higgs_jax as hj

print("jax", jax.__version__, "| devices:", jax.devices())""",
    ),
    (
        "md",
        """\
## 1. Load the model, tokenizer and text

`load_checkpoint` takes an HF directory (`config.json` + safetensors) or a `.gguf` file and returns
a plain nested dict of arrays in Flax layout (kernels are `(in, out)`) plus a frozen `LlamaConfig`.
stories260k was trained with BOS once at the start of each story, so the stream gets `bos_id=1`.""",
    ),
    (
        "code",
        """\
from higgs_jax.checkpoints import load_checkpoint
from higgs_jax.evaluate import tokenize_text
from higgs_jax.quickstart import default_model_dir, default_text_file
from higgs_jax.tokenizer import load_tokenizer

params, config = load_checkpoint(default_model_dir())
tok = load_tokenizer(default_model_dir(), config)
tokens = tokenize_text(tok, default_text_file().read_text(), bos_id=config.bos_token_id or 1)

n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
print(f"{n_params:,} parameters, {len(tokens):,} tokens of text")
print(jax.tree_util.tree_map(lambda x: x.shape, params["layers_0"]))""",
    ),
    (
        "md",
        """\
## 2. Plan from shapes only

Which leaf gets which method is decided by ordered path rules `(regex, spec | None)`: first match
wins, `None` keeps full precision. `plan_quantization` works on `jax.ShapeDtypeStruct`s, so a big
model can be planned (and its size predicted, scales and padding included) before any weight is
loaded.

The embedding (tied to the LM head here) stays in fp32. `hadamard_size=64` divides the hidden
size 64, but not the MLP width 172 that `down_proj` contracts over: 172 = 4 * 43 has no supported
Hadamard order near 64, so the default `indivisible="auto"` policy zero-pads K from 172 to 192
(three blocks of 64). The padding is stored and counted, which is why `down_proj` costs a bit more
than 4 bits/weight below. (`indivisible="error"` would refuse instead.)""",
    ),
    (
        "code",
        """\
def rules_for(spec):
    return [(r"embed_tokens", None), (r"kernel$", spec)]


higgs4 = hj.HiggsConfig(bits=4, p=2, hadamard_size=64)
plan = hj.plan_quantization(jax.eval_shape(lambda: params), rules_for(higgs4))
for path in ["embed_tokens/embedding", "layers_0/attn/q_proj/kernel",
             "layers_0/mlp/down_proj/kernel"]:
    lp = plan[path]
    print(f"{path:32s} {str(lp.shape):10s} {lp.spec.describe() if lp.spec else 'kept':34s} "
          f"{lp.bits_per_weight:6.3f} bits/weight")""",
    ),
    (
        "md",
        """\
## 3. Quantize: HIGGS at 4 / 3 / 2 bits and the RTN / NF4 baselines

All methods produce the same `HiggsTensor` type (the baselines are the same pipeline with no
rotation and a scalar grid), so everything downstream is shared. `report.table()` lists every
leaf: shape, method, bits/weight including scales and padding, and the relative error t².""",
    ),
    (
        "code",
        """\
specs = {
    "HIGGS 4b": hj.HiggsConfig(bits=4, p=2, hadamard_size=64),
    "HIGGS 3b": hj.HiggsConfig(bits=3, p=2, hadamard_size=64),
    "HIGGS 2b": hj.HiggsConfig(bits=2, p=2, hadamard_size=64),
    "NF4": hj.NF4Config(),
    "RTN 4b g64": hj.RTNConfig(bits=4, group_size=64),
}
quantized, reports = {}, {}
for name, spec in specs.items():
    t0 = time.perf_counter()
    quantized[name], reports[name] = hj.quantize_params(params, rules_for(spec))
    print(f"{name:11s} {spec.describe():36s} {time.perf_counter() - t0:5.2f} s")

print()
print(reports["HIGGS 4b"].table())""",
    ),
    (
        "md",
        """\
## 4. Perplexity and the bits / quality trade-off

Non-overlapping windows of 512 tokens (the model's context), exp of the mean NLL over predicted
tokens; 8 windows keep this quick (the package's tests use 40 for the reference 4.0677).

`perplexity` takes a quantized tree directly (`perplexity(qparams, config, tokens, ...)` runs the
fused quantized matmuls of section 5; that is what you want on a GPU). On a CPU, XLA takes a while
to compile the fused forward for each quantization layout, so this cell evaluates each method on
its dequantized weights (`hj.dequantize_params`): the same numbers in a dense tree, which reuses
the one compiled fp32 forward. Section 5 checks that both paths give the same logits.""",
    ),
    (
        "code",
        """\
from higgs_jax.evaluate import perplexity



def ppl(p):
    return perplexity(p, config, tokens, seqlen=512, num_windows=8, batch_size=8,
                      progress=False).ppl


results = {"fp32": (32.0, ppl(params))}  # {method: (bits/weight, PPL)}
for name, q in quantized.items():
    results[name] = (reports[name].quantized_bits_per_weight, ppl(hj.dequantize_params(q)))

print(f"{'method':11s} {'bits/w':>7s} {'PPL':>9s}")
for name, (bpw, ppl) in results.items():
    print(f"{name:11s} {bpw:7.3f} {ppl:9.4f}")""",
    ),
    (
        "code",
        """\
%matplotlib inline
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 3.8))
for family, marker in [("HIGGS", "o"), ("NF4", "s"), ("RTN", "^")]:
    pts = sorted(v for k, v in results.items() if k.startswith(family))
    ax.plot([b for b, _ in pts], [q for _, q in pts], marker=marker, label=family)
ax.axhline(results["fp32"][1], color="gray", ls="--", label="fp32")
ax.set(xlabel="bits per weight (codes + scales + padding)", ylabel="perplexity", yscale="log",
       title="stories260k: PPL vs bits/weight")
ax.grid(alpha=0.3)
ax.legend()
plt.show()""",
    ),
    (
        "md",
        """\
## 5. Quantized params inside your own jitted code

`forward(params, tokens, config)` dispatches each linear layer on its leaf type: a plain array is a
matmul, a `HiggsTensor` goes to `higgs_matmul` (a Pallas kernel on NVIDIA GPUs, XLA elsewhere).
So one jitted function of yours takes either tree; each tree structure compiles once. The fused
path computes `(H x) @ decode(codes) * scales` without materialising W, and agrees with the
dequantized dense tree to float rounding.""",
    ),
    (
        "code",
        """\
from higgs_jax.models.llama import forward

qparams = quantized["HIGGS 4b"]


@jax.jit
def next_token_logits(params, tokens):
    logits, _ = forward(params, tokens, config)
    return logits[:, -1]


batch = jnp.asarray(tokens[:64].reshape(2, 32))
fp_logits = next_token_logits(params, batch)
q_logits = next_token_logits(qparams, batch)  # fused quantized matmuls
dq_logits = next_token_logits(hj.dequantize_params(qparams), batch)  # dense copy of the same weights
print("max |logit diff| fp vs HIGGS 4b:", float(jnp.max(jnp.abs(fp_logits - q_logits))))
print("max |logit diff| fused vs dequantized:", float(jnp.max(jnp.abs(q_logits - dq_logits))))
print("same argmax as fp:", np.asarray(jnp.argmax(fp_logits, -1) == jnp.argmax(q_logits, -1)))""",
    ),
    (
        "md",
        """\
A `HiggsTensor` is a pytree node: its children are the packed `codes` (uint32), the `scales` and
the optional `signs`; shapes, grid and block sizes are static metadata. Tree utilities see those
arrays; pass `is_leaf` to stop at the tensor itself.""",
    ),
    (
        "code",
        """\
qt = qparams["layers_0"]["mlp"]["down_proj"]["kernel"]
print(qt)
for keypath, leaf in jax.tree_util.tree_leaves_with_path(qt):  # the pytree children
    print(f"  {jax.tree_util.keystr(keypath):10s} {leaf.dtype} {leaf.shape}")

# Whole tree on a device (sharding works the same way), and a per-tensor summary via is_leaf.
qparams_dev = jax.device_put(qparams, jax.devices()[0])
is_q = lambda x: isinstance(x, hj.HiggsTensor)  # noqa: E731
bits = jax.tree_util.tree_map(lambda x: round(x.bits_per_weight, 3) if is_q(x) else "fp32",
                              qparams_dev, is_leaf=is_q)
print(bits["layers_0"]["mlp"])

# One layer: the fused matmul against the dense dequantized weight.
x = jax.random.normal(jax.random.key(0), (4, qt.shape[0]))
y_fused = hj.higgs_matmul(x, qt)
y_dense = x @ hj.dequantize(qt)
print("higgs_matmul vs x @ dequantize(qt): max abs diff",
      float(jnp.max(jnp.abs(y_fused - y_dense))))""",
    ),
    (
        "md",
        """\
## 6. Generate

Greedy decoding with a KV cache (one jitted prefill plus a `fori_loop`), from the fp and the
4-bit model.""",
    ),
    (
        "code",
        """\
from higgs_jax.models.llama import generate

prompt_ids = tokenize_text(tok, "Once upon a time", bos_id=config.bos_token_id or 1)
for name, p in [("fp32", params), ("HIGGS 4b", qparams)]:
    out = generate(p, config, prompt_ids, 32)
    print(f"[{name}] {tok.decode(np.asarray(out).tolist())!r}")""",
    ),
    (
        "md",
        """\
## 7. Save and restore with orbax

Codes, scales and signs are saved as ordinary arrays, the static metadata as JSON beside them;
`load_params` rebuilds the `HiggsTensor`s (and validates them).""",
    ),
    (
        "code",
        """\
import tempfile
from pathlib import Path

from higgs_jax.checkpoints.orbax import load_params, save_params

with tempfile.TemporaryDirectory() as d:
    path = save_params(Path(d) / "stories260k-higgs4", qparams,
                       metadata={"spec": specs["HIGGS 4b"].describe()})
    restored, meta = load_params(path)

print(meta)
same = jax.tree_util.tree_all(jax.tree_util.tree_map(
    lambda a, b: bool(jnp.array_equal(a, b)), qparams, restored))
print("restored tree identical:", same)""",
    ),
]


def build() -> nbformat.NotebookNode:
    cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["colab"] = {"provenance": []}
    # Deterministic cell ids so that rebuilding gives a byte-identical file.
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    nbformat.validate(nb)
    return nb


def render() -> str:
    return nbformat.writes(build()) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the notebook is out of date")
    ap.add_argument("--out", type=Path, default=NOTEBOOK)
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(
                f"{args.out} is out of date: run python scripts/make_notebook.py", file=sys.stderr
            )
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
