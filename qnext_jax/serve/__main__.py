"""python -m qnext_jax.serve [--model DIR] [--port 8000] ...   (vLLM's flag names)

An OpenAI-compatible server with continuous batching. Without --model it serves the embedded
demo model. The cache is sized at start-up, so an out-of-memory shows here, not mid-request.
"""

from __future__ import annotations

import argparse
import logging
import sys

from qnext_jax.llm import add_engine_args


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m qnext_jax.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_engine_args(ap)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="name(s) clients use in `model`; the first is reported (default: --model)",
    )
    ap.add_argument(
        "--max-queue-len",
        type=int,
        default=256,
        help="requests that may wait for a slot; beyond it new requests get 503",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    import uvicorn

    from qnext_jax.llm import LLM, engine_kwargs
    from qnext_jax.serve.app import build_app

    try:
        llm = LLM(args.model, seed=args.seed, **engine_kwargs(args))
    except (ValueError, FileNotFoundError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = args.served_model_name or [args.model or "qnext-demo"]
    warm_up(llm)
    app = build_app(llm, served_model_names=names, max_queue_len=args.max_queue_len)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=30
    )
    return 0


def warm_up(llm) -> None:
    """Compile prefill and decode once before the port opens (the first request would wait)."""
    from qnext_jax.sampling import SamplingParams

    llm.generate([llm.eos_ids[0]] * 2, SamplingParams(max_tokens=2, ignore_eos=True))


if __name__ == "__main__":
    sys.exit(main())
