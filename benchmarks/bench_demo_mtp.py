"""MTP speculative decoding on the trained demo model: greedy decode speed and acceptance with
k = 0 (plain), 1, 2, 3 on held-out questions (thinking on), and whether outputs match plain.

  python benchmarks/bench_demo_mtp.py [--batch 1] [--questions 8] [--max-tokens 160]

Each k runs the question set twice; the second run is timed (compiles excluded). Decode tok/s
counts generated tokens after the first of each request over the wall time after first tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from qnext_jax.chat import render_chat  # noqa: E402
from qnext_jax.config import RuntimeOptions  # noqa: E402
from qnext_jax.demo.evaluate import heldout_set  # noqa: E402
from qnext_jax.engine import Engine, EngineConfig  # noqa: E402
from qnext_jax.llm import LLM  # noqa: E402
from qnext_jax.sampling import SamplingParams  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--gdn-impl", default="auto", help="auto | pallas | chunked | recurrent")
    args = ap.parse_args()
    llm = LLM(None, max_model_len=512, options=RuntimeOptions(gdn_impl=args.gdn_impl))
    tok = llm.tokenizer
    qs = [ex.question for ex in heldout_set(n_per_level=args.questions)[-args.questions :]]
    prompts = [
        tok.encode(render_chat(tok, [{"role": "user", "content": q}], {}), add_special_tokens=False)
        for q in qs
    ]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    print(
        f"jax {jax.__version__} {jax.devices()[0].device_kind}; dtype {llm.model.dtype}; "
        f"{len(prompts)} held-out questions, batch {args.batch}"
    )
    rows, plain = [], None
    for k in (0, 1, 2, 3):
        engine = Engine(
            llm.model,
            EngineConfig(
                max_num_seqs=args.batch,
                max_model_len=512,
                num_speculative_tokens=k,
                decode_block=16,
            ),
            eos_ids=llm.eos_ids,
        )
        for _ in range(2):  # the second run is timed
            reqs = [engine.add_request(p, params) for p in prompts]
            t = time.perf_counter()
            while engine.has_work():
                engine.step()
            wall = time.perf_counter() - t
        outs = [r.output_ids for r in reqs]
        plain = outs if k == 0 else plain
        n = sum(len(o) for o in outs)
        steps = sum(r.spec_steps for r in reqs)
        acc = [sum(r.spec_accepted[i] for r in reqs) / steps for i in range(k)] if k else []
        rows.append((k, n / wall, acc, (n / steps) if k else 1.0, outs == plain))
    base = rows[0][1]
    print("\n| k | tokens/s | speedup | acceptance per position | tokens per step | equals plain |")
    print("|---|---|---|---|---|---|")
    for k, tps, acc, tps_step, same in rows:
        print(
            f"| {k} | {tps:.0f} | {tps / base:.2f}x | {', '.join(f'{a:.2f}' for a in acc) or '-'} "
            f"| {tps_step:.2f} | {same} |"
        )


if __name__ == "__main__":
    main()
