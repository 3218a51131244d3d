"""python -m qnext_convert --model HF_DIR --out DIR [--dtype bfloat16]"""

import argparse

from qnext_jax.config import RuntimeOptions

from .checkpoint import load_pretrained, save_converted


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m qnext_convert", description=__doc__)
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--out", required=True, help="output directory (orbax parameters + side files)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    args = ap.parse_args(argv)
    model = load_pretrained(args.model, RuntimeOptions(dtype=args.dtype))
    out = save_converted(model, args.model, args.out)
    print(f"converted {args.model} -> {out}")


if __name__ == "__main__":
    main()
