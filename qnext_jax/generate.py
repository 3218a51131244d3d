"""python -m qnext_jax.generate --model DIR --prompt TEXT   (vLLM's flag names)

Streams the answer to stdout (reasoning, when the model thinks, marked as such), then prints
the prompt length, time to first token and decode speed. Without --model it runs the embedded
default model.
"""

from __future__ import annotations

import argparse
import sys
import time

from qnext_jax.llm import add_engine_args
from qnext_jax.sampling import SamplingParams


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m qnext_jax.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_engine_args(ap)
    ap.add_argument(
        "--prompt", action="append", required=True, help="the prompt (repeat for several prompts)"
    )
    chat = ap.add_mutually_exclusive_group()
    chat.add_argument(
        "--chat",
        dest="chat",
        action="store_true",
        default=True,
        help="render the prompt as a user message with the chat template (default)",
    )
    chat.add_argument(
        "--no-chat", dest="chat", action="store_false", help="use the prompt as raw text"
    )
    think = ap.add_mutually_exclusive_group()
    think.add_argument(
        "--enable-thinking", dest="enable_thinking", action="store_true", default=None
    )
    think.add_argument("--disable-thinking", dest="enable_thinking", action="store_false")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--min-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from qnext_jax.llm import LLM, engine_kwargs

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            seed=args.seed,
        )
        llm = LLM(args.model, **engine_kwargs(args))
    except (ValueError, FileNotFoundError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kwargs = {} if args.enable_thinking is None else {"enable_thinking": args.enable_thinking}
    for prompt in args.prompt:
        t0 = time.perf_counter()
        source = [{"role": "user", "content": prompt}] if args.chat else prompt
        section = None
        final = None
        for reasoning, content, result in llm.stream(
            source, params, chat_template_kwargs=kwargs, chat=args.chat
        ):
            final = result
            for kind, delta in (("reasoning", reasoning), ("answer", content)):
                if not delta:
                    continue
                if kind != section:
                    print(f"\n[{kind}]\n" if section else f"[{kind}]\n", end="")
                    section = kind
                print(delta, end="", flush=True)
        out = final.outputs[0]
        m = final.metrics
        if out.spec_decode is not None:
            sd = out.spec_decode
            rates = ", ".join(f"{r:.2f}" for r in sd.acceptance_rate_per_position)
            print(
                f"\n\n--- MTP: drafted {sd.num_draft_tokens}, accepted {sd.num_accepted_tokens} "
                f"({sd.acceptance_rate:.2f}; per position {rates}), mean accepted length "
                f"{sd.mean_accepted_length:.2f}",
                end="",
            )
        tps = m.decode_tokens_per_s(len(out.token_ids))
        summary = (
            f"\n\n--- prompt tokens {len(final.prompt_token_ids)} | generated "
            f"{len(out.token_ids)} ({out.finish_reason}) | TTFT {m.ttft * 1e3:.1f} ms"
        )
        if tps:
            summary += f" | decode {tps:.1f} tok/s | wall {time.perf_counter() - t0:.2f} s"
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
