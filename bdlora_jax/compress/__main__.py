"""`python -m bdlora_jax.compress --adapters DIR [DIR ...] --rank K [--clusters C] [--method full|diag] --out DIR`.

Each DIR is a PEFT adapter directory or a directory of them (its subdirectories with an adapter_config.json,
named by their directory names). Writes a compressed bank (manifest.json + bank.safetensors) and prints the
reconstruction error per adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..adapters.peft_io import CONFIG_FILE, AdapterError


def adapter_dirs(paths: list[Path]) -> list[Path]:
    """Adapter directories from a mix of adapter directories and directories holding them."""
    out = []
    for path in paths:
        if (path / CONFIG_FILE).is_file():
            out.append(path)
            continue
        children = sorted(p for p in path.iterdir() if (p / CONFIG_FILE).is_file()) if path.is_dir() else []
        if not children:
            raise AdapterError(f"{path}: neither a PEFT adapter directory nor a directory of them "
                               f"(no {CONFIG_FILE} in it or its subdirectories)")
        out.extend(children)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bdlora_jax.compress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=Path, nargs="+", required=True, help="adapter directories or parents")
    parser.add_argument("--model", default="demo", help="base model: 'demo' or a Hugging Face model directory")
    parser.add_argument("--rank", type=int, required=True, help="rank of the shared bases per module (all blocks)")
    parser.add_argument("--clusters", type=int, default=1, help="clusters, each with its own bases")
    parser.add_argument("--method", default="full", choices=("full", "diag"), help="Σ per adapter: full r×r or diagonal")
    parser.add_argument("--blocks", type=int, default=1,
                        help="block-diagonal variant: bases per block (a multiple of the serving model-axis size)")
    parser.add_argument("--tol", type=float, default=1e-5, help="stop when the error improves by less (relative)")
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="compressed-bank directory to write")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..adapters.peft_io import read_adapter
    from ..checkpoint import resolve_model_config
    from .compressor import compress_adapters

    try:
        config = resolve_model_config(args.model)
        dirs = adapter_dirs(args.adapters)
        adapters = [read_adapter(d, config, d.name) for d in dirs]
        bank = compress_adapters(adapters, config, args.rank, args.clusters, args.method, args.blocks,
                                 tol=args.tol, max_iter=args.max_iter, seed=args.seed, progress=not args.json,
                                 sources=[str(d) for d in dirs])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bank.save(args.out)
    errors = {name: {key: e for key, e in entry["errors"].items()} for name, entry in
              ((a["name"], a) for a in bank.manifest()["adapters"])}
    mean = {name: sum(e.values()) / len(e) for name, e in errors.items()}
    if args.json:
        print(json.dumps({"out": str(args.out), "adapters": len(adapters), "rank": args.rank, "clusters": args.clusters,
                          "method": args.method, "blocks": args.blocks, "mean_error": mean,
                          "clusters_of": dict(zip(bank.names, map(int, bank.clusters))), "fit": bank.fit}))
        return 0
    print(f"compressed {len(adapters)} adapters into {args.out}: rank {args.rank}, {args.clusters} cluster(s), "
          f"method {args.method}, {args.blocks} block(s)")
    print(f"{'adapter':<32}{'cluster':>8}{'mean rel. error':>18}{'worst module':>24}")
    for i, name in enumerate(bank.names):
        worst = max(errors[name], key=errors[name].get)
        print(f"{name:<32}{int(bank.clusters[i]):>8}{mean[name]:>18.4f}{worst:>16} {errors[name][worst]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
