"""`higgs-jax` command line: quickstart, quantize, eval, generate, grids.

Strings from the command line are parsed into frozen specs here, once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

DESCRIPTION = """\
higgs-jax: data-free LLM weight quantization (HIGGS) for JAX.

Typical use:
  higgs-jax quickstart                          # tiny embedded model: HIGGS vs RTN/NF4, PPL table + plot
  higgs-jax quantize --model DIR_OR_GGUF --out q4 --bits 4 --p 2
  higgs-jax eval --model q4 --text wiki.test.txt --seqlen 2048
  higgs-jax generate --model q4 --prompt "Once upon a time"
  higgs-jax grids                                # the shipped Gaussian grids and their MSE
  higgs-jax calibrate-alphas --model M --text calib.txt --out alphas.json
  higgs-jax quantize --model M --out q --dynamic --bits 3.25 --alphas alphas.json
"""


def _add_quant_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("quantization")
    g.add_argument("--method", choices=["higgs", "rtn", "nf4", "gptq", "quantease"],
                   default="higgs",
                   help="higgs (rotation + Gaussian grid, default), rtn (absmax integer grid), "
                        "nf4 (bitsandbytes levels); data-aware on the --base spec's grid and "
                        "scales (needs --calib): gptq (HIGGS+GPTQ), quantease (coordinate descent)")
    g.add_argument("--bits", type=float, default=4,
                   help="bits per weight of the grid, scales not included (default 4)")
    g.add_argument("--p", type=int, default=2, help="HIGGS grid dimension 1..4 (default 2)")
    g.add_argument("--hadamard-size", type=int, default=512,
                   help="HIGGS Hadamard block size h (default 512; non-divisible K handled by "
                        "--indivisible)")
    g.add_argument("--group-size", type=int, default=None,
                   help="scale group size (HIGGS: default h; RTN: default 128; NF4: block, 64)")
    g.add_argument("--indivisible", choices=["auto", "pad", "error"], default="auto",
                   help="HIGGS when h does not divide K: auto = nearest Hadamard order dividing K, "
                        "else pad (default); pad; error")
    g.add_argument("--random-signs", action="store_true",
                   help="HIGGS: seeded random sign flips before the rotation (stored)")
    g.add_argument("--seed", type=int, default=0, help="PRNG seed (random signs)")
    g.add_argument("--exclude", action="append", default=None, metavar="REGEX",
                   help="keep parameters whose path matches REGEX in full precision "
                        "(repeatable; default: embeddings and lm_head)")
    g.add_argument("--include", default=r"(^|/)kernel$", metavar="REGEX",
                   help="quantize 2-D parameters whose path matches REGEX (default: every kernel)")
    w = ap.add_argument_group("data-aware methods (--method gptq | quantease)")
    w.add_argument("--base", choices=["higgs", "rtn", "nf4"], default="higgs",
                   help="data-free spec whose grid, rotation and scales gptq/quantease keep "
                        "(built from --bits/--p/--hadamard-size/--group-size; default higgs)")
    w.add_argument("--calib", default=None, metavar="FILE",
                   help="calibration text (default: the workspace's WikiText-2 validation text "
                        "if present; never use your evaluation split)")
    w.add_argument("--calib-samples", type=int, default=128,
                   help="calibration windows (distinct random starts, default 128)")
    w.add_argument("--calib-seqlen", type=int, default=2048,
                   help="tokens per calibration window (default 2048, capped at the model's "
                        "max_position_embeddings)")
    w.add_argument("--calib-seed", type=int, default=0, help="seed of the window starts")
    w.add_argument("--calib-batch", type=int, default=8, help="windows per forward pass")
    w.add_argument("--sequential", choices=["layer", "block", "none"], default="layer",
                   help="layer: each linear layer sees the outputs of already-quantized earlier "
                        "layers (default); block: at block granularity; none: fp statistics")
    w.add_argument("--sigma-cache", default=None, metavar="DIR",
                   help="load Sigma = X^T X from DIR if present (metadata must match), else "
                        "compute and save it there")
    w.add_argument("--damp", type=float, default=0.01,
                   help="GPTQ dampening, fraction of mean(diag Sigma) (default 0.01)")
    w.add_argument("--sweeps", type=int, default=20, help="QuantEase sweeps (default 20)")
    w.add_argument("--init", choices=["gptq", "rtn"], default="gptq",
                   help="QuantEase warm start (default gptq)")
    w.add_argument("--outliers", type=float, default=None, metavar="FRACTION",
                   help="QuantEase: keep this fraction of weights (e.g. 0.01) as full-precision "
                        "sparse outliers (stored, counted in bits/weight)")
    d = ap.add_argument_group("dynamic bitwidths (linearity theorem + DP)")
    d.add_argument("--dynamic", action="store_true",
                   help="treat --bits as an average budget in bits/weight (scales included) and "
                        "choose each layer's grid by the DP over calibrated alphas")
    d.add_argument("--alphas", default=None, metavar="FILE",
                   help="alpha table from `higgs-jax calibrate-alphas` (required with --dynamic)")
    d.add_argument("--measure-errors", action="store_true",
                   help="measure every layer's t^2 per option instead of the grid-MSE shortcut")


def spec_from_args(args):
    from higgs_jax.config import HiggsConfig, NF4Config, RTNConfig

    if args.method == "higgs":
        return HiggsConfig(bits=args.bits, p=args.p, hadamard_size=args.hadamard_size,
                           group_size=args.group_size, random_signs=args.random_signs,
                           indivisible=args.indivisible)
    if args.method == "rtn":
        if args.bits != int(args.bits):
            raise ValueError(f"RTN needs integer --bits, got {args.bits}")
        return RTNConfig(bits=int(args.bits), group_size=args.group_size or 128)
    if args.bits != 4:
        raise ValueError(f"NF4 is 4-bit; --bits {args.bits} is not valid with --method nf4")
    return NF4Config(block_size=args.group_size or 64)


DATAWISE_METHODS = ("gptq", "quantease")


def datawise_wrapper(args):
    """spec -> GPTQConfig / QuantEaseConfig(spec, ...) from the data-aware arguments."""
    from higgs_jax.datawise.specs import GPTQConfig, QuantEaseConfig

    if args.method == "gptq":
        if args.outliers is not None:
            raise ValueError("--outliers needs --method quantease")
        return lambda base: GPTQConfig(base, damp=args.damp)
    return lambda base: QuantEaseConfig(base, num_sweeps=args.sweeps, init=args.init,
                                        outlier_fraction=args.outliers, damp=args.damp)


def datawise_spec_from_args(args):
    """The data-aware spec of --method gptq/quantease around the --base spec."""
    base = spec_from_args(argparse.Namespace(**{**vars(args), "method": args.base}))
    return datawise_wrapper(args)(base)


def rules_from_args(args, spec):
    from higgs_jax.params import EXCLUDE_EMBEDDINGS, Rule

    excludes = ((EXCLUDE_EMBEDDINGS,) if args.exclude is None
                else tuple(Rule(rx, None) for rx in args.exclude))
    return excludes + (Rule(args.include, spec),)


def _load_any(path: str):
    """(params, config or None, tokenizer source dir or None, metadata) for any supported input."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"model path {path} does not exist")
    if p.is_dir() and (p / "higgs_meta.json").is_file():
        from higgs_jax.checkpoints.orbax import load_params

        params, meta = load_params(p)
        config = None
        if "model_config" in meta:
            from higgs_jax.models.llama import LlamaConfig

            config = LlamaConfig(**meta["model_config"])
        return params, config, p, meta
    if p.is_file() and p.suffix == ".safetensors":
        from safetensors.numpy import load_file

        flat = load_file(str(p))
        tree: dict = {}
        for k, v in flat.items():
            node = tree
            parts = k.split("/")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = v
        return tree, None, None, {}
    from higgs_jax.checkpoints import load_checkpoint

    params, config = load_checkpoint(p)
    return params, config, (p.parent if p.is_file() else p), {}


def _dynamic_plan(args, params, rules):
    from higgs_jax.allocation import dynamic
    from higgs_jax.allocation.calibrate import AlphaTable

    if args.method != "higgs":
        raise ValueError(f"--dynamic works with --method higgs, got {args.method}")
    if not args.alphas:
        raise ValueError("--dynamic needs --alphas FILE (make one with `higgs-jax calibrate-alphas`)")
    alphas = AlphaTable.load(args.alphas)
    options = dynamic.default_options(args.hadamard_size)
    table = dynamic.error_table(params, options, rules=rules, measure=args.measure_errors,
                                progress=True)
    alphas.check_matches(table.layers)
    sol = dynamic.solve_dynamic(table, alphas.as_dict(), args.bits)
    print(f"DP plan: predicted dPPL {sol.predicted:.4f}, {sol.avg_bits:.3f} bits/weight "
          f"(budget {args.bits})")
    return dynamic.plan_from_choices(params, table, sol.choices, rules=rules), sol


def cmd_quantize(args) -> int:
    import dataclasses

    import jax

    from higgs_jax.checkpoints.orbax import save_params
    from higgs_jax.params import quantize_params

    if args.method in DATAWISE_METHODS:
        return _quantize_datawise_cmd(args)
    if args.dynamic:
        from higgs_jax.config import HiggsConfig

        spec = HiggsConfig(bits=4, p=args.p, hadamard_size=args.hadamard_size)
    else:
        spec = spec_from_args(args)
    rules = rules_from_args(args, spec)
    params, config, tok_dir, _ = _load_any(args.model)
    plan, sol = (None, None)
    if args.dynamic:
        plan, sol = _dynamic_plan(args, params, rules)
    t0 = time.perf_counter()
    qparams, report = quantize_params(params, rules, key=jax.random.key(args.seed), progress=True,
                                      plan=plan)
    seconds = time.perf_counter() - t0
    meta = {"source": str(args.model), "spec": f"dynamic {args.bits} bits" if args.dynamic
            else spec.describe(), "report": report.summary(), "quantize_seconds": seconds}
    if sol is not None:
        meta["dynamic"] = {"budget": args.bits, "predicted_dppl": float(sol.predicted),
                           "avg_bits": float(sol.avg_bits)}
    if config is not None:
        meta["model_config"] = dataclasses.asdict(config)
    out = save_params(args.out, qparams, metadata=meta)
    if tok_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
            if (Path(tok_dir) / name).is_file():
                shutil.copy(Path(tok_dir) / name, out / name)
    report_path = Path(args.report) if args.report else out / "report.json"
    report_path.write_text(report.to_json())
    print(report.table())
    print(f"quantized in {seconds:.1f}s; checkpoint {out}; report {report_path}")
    return 0


def _quantize_datawise_cmd(args) -> int:
    """cmd_quantize for --method gptq | quantease: calibration text -> sequential quantization."""
    import dataclasses

    import jax

    from higgs_jax.checkpoints.orbax import save_params
    from higgs_jax.datawise.calibration import default_calibration_file
    from higgs_jax.datawise.pipeline import datawise_plan, quantize_params_datawise
    from higgs_jax.evaluate import tokenize_text
    from higgs_jax.tokenizer import load_tokenizer

    if args.dynamic and args.base != "higgs":
        raise ValueError(f"--dynamic works with --base higgs, got --base {args.base}")
    wrap = datawise_wrapper(args)
    if args.dynamic:
        from higgs_jax.config import HiggsConfig

        dyn_base = HiggsConfig(bits=4, p=args.p, hadamard_size=args.hadamard_size)
        wrap(dyn_base)  # validates the data-aware arguments before any loading
    else:
        spec = datawise_spec_from_args(args)
    calib = Path(args.calib) if args.calib else default_calibration_file()
    if calib is None:
        raise ValueError(f"--method {args.method} needs --calib FILE (calibration text, e.g. "
                         "WikiText-2 validation; never the evaluation split)")
    if not calib.is_file():
        raise ValueError(f"calibration text {calib} does not exist")
    params, config, tok_dir, _ = _load_any(args.model)
    if config is None or tok_dir is None:
        raise ValueError(f"--method {args.method} needs a model checkpoint with config and "
                         f"tokenizer (HF directory, GGUF or higgs-jax checkpoint), got {args.model}")
    tokens = tokenize_text(load_tokenizer(tok_dir, config), calib.read_text())
    seqlen = min(args.calib_seqlen, config.max_position_embeddings)
    sol = None
    if args.dynamic:
        rules = rules_from_args(args, dyn_base)
        shim = argparse.Namespace(**{**vars(args), "method": "higgs"})
        plan, sol = _dynamic_plan(shim, params, rules)
        target = datawise_plan(plan, wrap)
        spec_desc = f"dynamic {args.bits} bits, {args.method}"
    else:
        # Rule objects take plain specs only: the data-aware spec goes into a (regex, spec) tuple.
        target = rules_from_args(args, spec.base)[:-1] + ((args.include, spec),)
        spec_desc = spec.describe()
    t0 = time.perf_counter()
    qparams, report = quantize_params_datawise(
        params, config, tokens, target, num_samples=args.calib_samples, seqlen=seqlen,
        seed=args.calib_seed, key=jax.random.key(args.seed), progress=True,
        cache_dir=args.sigma_cache, calib_source=str(calib), sequential=args.sequential,
        batch_size=args.calib_batch)
    seconds = time.perf_counter() - t0
    meta = {"source": str(args.model), "spec": spec_desc, "report": report.summary(),
            "quantize_seconds": seconds, "model_config": dataclasses.asdict(config)}
    if sol is not None:
        meta["dynamic"] = {"budget": args.bits, "predicted_dppl": float(sol.predicted),
                           "avg_bits": float(sol.avg_bits)}
    out = save_params(args.out, qparams, metadata=meta)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        if (Path(tok_dir) / name).is_file():
            shutil.copy(Path(tok_dir) / name, out / name)
    report_path = Path(args.report) if args.report else out / "report.json"
    report_path.write_text(report.to_json())
    print(report.table())
    print(f"quantized in {seconds:.1f}s (calibration passes "
          f"{report.calibration['calibration_seconds']:.1f}s); checkpoint {out}; "
          f"report {report_path}")
    return 0


def _model_for_inference(path: str):
    params, config, tok_dir, meta = _load_any(path)
    if config is None:
        raise ValueError(f"{path} holds no model config: eval/generate need a model checkpoint "
                         "(HF directory, GGUF file, or a checkpoint written by `higgs-jax quantize`)")
    from higgs_jax.tokenizer import load_tokenizer

    if tok_dir is None:
        raise ValueError(f"no tokenizer found next to {path}")
    return params, config, load_tokenizer(tok_dir, config)


def cmd_eval(args) -> int:
    from higgs_jax.evaluate import perplexity, tokenize_text

    params, config, tok = _model_for_inference(args.model)
    text = Path(args.text)
    if not text.is_file():
        raise ValueError(f"text file {args.text} does not exist")
    tokens = tokenize_text(tok, text.read_text(), bos_id=args.bos_id)
    res = perplexity(params, config, tokens, seqlen=args.seqlen, num_windows=args.windows,
                     batch_size=args.batch_size)
    print(json.dumps({"model": args.model, "text": args.text, "seqlen": args.seqlen,
                      "num_windows": res.num_windows, "num_tokens": res.num_tokens,
                      "nll": res.nll_mean, "ppl": res.ppl}))
    return 0


def cmd_generate(args) -> int:
    import jax
    import numpy as np

    from higgs_jax.evaluate import tokenize_text
    from higgs_jax.models.llama import generate

    params, config, tok = _model_for_inference(args.model)
    if not args.no_fuse:
        from higgs_jax.fuse import prepare_for_inference

        # one-time kernel repack on an NVIDIA GPU + one matmul for q/k/v and for gate/up (same
        # function; measured 1.32x decode speed-up at 4 bits on a Llama-3.1-8B shape, H100)
        params, _ = prepare_for_inference(params)
    ids = tokenize_text(tok, args.prompt, bos_id=args.bos_id)
    out = generate(params, config, ids, args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, key=jax.random.key(args.seed))
    print(tok.decode(np.asarray(out).tolist()))
    return 0


def cmd_calibrate_alphas(args) -> int:
    import jax

    from higgs_jax.allocation.calibrate import calibrate_alphas
    from higgs_jax.evaluate import perplexity, tokenize_text

    params, config, tok = _model_for_inference(args.model)
    text = Path(args.text)
    if not text.is_file():
        raise ValueError(f"text file {args.text} does not exist")
    tokens = tokenize_text(tok, text.read_text(), bos_id=args.bos_id)

    def ppl(p):
        return perplexity(p, config, tokens, seqlen=args.seqlen, num_windows=args.windows,
                          batch_size=args.windows, progress=False).ppl

    t2 = tuple(float(t) for t in args.t2.split(","))
    table = calibrate_alphas(params, ppl, t2_values=t2, mode=args.mode, seed=args.seed,
                             progress=True)
    table.meta.update({"model": args.model, "text": args.text, "seqlen": args.seqlen,
                       "windows": args.windows, "jax": jax.__version__,
                       "device": jax.devices()[0].device_kind})
    table.save(args.out)
    print(f"{len(table.layers)} alphas (base PPL {table.base_ppl:.4f}) written to {args.out}")
    for name, a in sorted(zip(table.layers, table.alphas), key=lambda t: -t[1])[:10]:
        print(f"  {a:10.4f}  {name}")
    return 0


def cmd_grids(args) -> int:
    from higgs_jax import grids

    print(f"{'p':>2s} {'n':>6s} {'bits':>6s} {'MSE (MC)':>10s} {'SPEC MSE':>10s} {'4^-b':>10s}")
    for p, n in grids.available_grids():
        spec = grids.gauss_grid(p, n)
        mse = grids.grid_mse(spec, num_samples=args.samples, seed=args.seed)
        ref = grids.SPEC_GRID_MSE.get((p, n))
        ref_s = f"{ref:10.5f}" if ref is not None else f"{'-':>10s}"
        print(f"{p:2d} {n:6d} {spec.bits:6.3f} {mse:10.5f} {ref_s} {4.0 ** -spec.bits:10.5f}")
    return 0


def cmd_quickstart(args) -> int:
    from higgs_jax import quickstart

    quickstart.run(args.model, args.text, args.out, seqlen=args.seqlen, num_windows=args.windows,
                   batch_size=args.batch_size)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="higgs-jax", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quickstart", help="quantize + evaluate HIGGS vs RTN/NF4, table and plot",
                       description="Quantize a model with HIGGS at 4/3/2 bits and with RTN/NF4, "
                       "measure perplexity, print a table, write results.json/.csv, pareto.png and "
                       "samples. With no arguments: the embedded tiny model (stories260k).")
    q.add_argument("--model", default=None, help="HF directory or .gguf (default: embedded)")
    q.add_argument("--text", default=None, help="evaluation text file (default: embedded)")
    q.add_argument("--out", default="higgs_quickstart", help="output directory")
    q.add_argument("--seqlen", type=int, default=None, help="window length (default min(2048, max))")
    q.add_argument("--windows", type=int, default=40, help="number of windows (default 40)")
    q.add_argument("--batch-size", type=int, default=8)
    q.set_defaults(func=cmd_quickstart)

    z = sub.add_parser("quantize", help="quantize a checkpoint to an orbax checkpoint + report",
                       description="Quantize every 2-D kernel (except embeddings and lm_head by "
                       "default) of a model or params file. Input: HF directory, .gguf file, "
                       "Flax-layout .safetensors params file (keys joined by '/'), or an orbax "
                       "checkpoint written by higgs-jax. Output: an orbax checkpoint directory "
                       "with the quantized tree, higgs_meta.json and report.json.")
    z.add_argument("--model", required=True, help="input checkpoint (see above)")
    z.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    z.add_argument("--report", default=None, help="where to write the JSON report "
                   "(default OUT/report.json)")
    _add_quant_args(z)
    z.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of an fp or quantized checkpoint",
                       description="Perplexity with the GPTQ/HIGGS protocol: tokenize the whole "
                       "file, non-overlapping windows of --seqlen, exp(mean NLL).")
    e.add_argument("--model", required=True)
    e.add_argument("--text", required=True)
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--windows", type=int, default=None, help="first N windows (default all)")
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--bos-id", type=int, default=None, help="prepend this BOS id once")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text from an fp or quantized checkpoint")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--bos-id", type=int, default=None)
    g.add_argument("--no-fuse", action="store_true",
                   help="keep q/k/v and gate/up as separate matmuls (default: fused for decoding)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("calibrate-alphas", help="measure per-layer sensitivities alpha",
                       description="Noise injection (linearity theorem): perturb one layer (or "
                       "block) at a time with relative noise t^2, measure the perplexity increase "
                       "on calibration text, fit dPPL = alpha * t^2. Use calibration text, not "
                       "your evaluation split.")
    c.add_argument("--model", required=True)
    c.add_argument("--text", required=True, help="calibration text file")
    c.add_argument("--out", required=True, help="output JSON")
    c.add_argument("--seqlen", type=int, default=2048)
    c.add_argument("--windows", type=int, default=4)
    c.add_argument("--mode", choices=["layer", "block"], default="layer")
    c.add_argument("--t2", default="0.00390625,0.0078125,0.015625",
                   help="comma-separated relative noise powers (linear regime, <= 1/16)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--bos-id", type=int, default=None)
    c.set_defaults(func=cmd_calibrate_alphas)

    r = sub.add_parser("grids", help="print the shipped grids with measured MSE and bits")
    r.add_argument("--samples", type=int, default=1 << 18, help="Monte-Carlo samples per grid")
    r.add_argument("--seed", type=int, default=1)
    r.set_defaults(func=cmd_grids)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"higgs-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
