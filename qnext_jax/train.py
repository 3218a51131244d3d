"""Train the small Qwen3-Next that ships as the embedded default model (and a tiny one for tests).

    python -m qnext_jax.train --preset demo --out DIR [--steps N | --time-budget S] [--seed S]

Loss: next-token cross-entropy on the assistant tokens, plus MTP_WEIGHT times the MTP head's loss on
the token after next, fed as at inference: step t takes the main model's post-norm hidden at t and
token t+1, and predicts token t+2. AdamW with linear warmup and cosine decay; fp32 master params,
bf16 compute; the batch order and init come from the seed alone, so a run is reproducible.

Data: the demo arithmetic chats, thinking on and off alternating 50/50. The loss covers what the
model must generate after the template's generation prompt: with thinking off the prompt already
holds the empty `<think>` block, so the model never learns to emit an empty block on its own, and
after a bare `assistant\\n` it always thinks.

The output directory is a Hugging Face checkpoint (config.json, model.safetensors with `mtp.*`,
generation_config.json, tokenizer files) plus a README.md model card with the measured quality.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qnext_jax.config import Qwen3NextConfig, RuntimeOptions, tiny_config
from qnext_jax.demo import data, evaluate, tokenizer
from qnext_jax.model import Qwen3NextForCausalLM

MTP_WEIGHT = 0.3
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


# ----------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class Preset:
    model: dict  # Qwen3NextConfig fields (vocab_size comes from the tokenizer)
    steps: int
    batch_size: int
    seq_len: int  # longer examples are dropped
    lr: float
    warmup: int
    n_examples: int  # size of the (repeating) training pool


PRESETS = {
    # 8 layers [GDN, GDN, GDN, attention] x 2, 16 experts top-4 + shared expert, partial RoPE, MTP.
    "demo": Preset(
        model=dict(
            hidden_size=192,
            intermediate_size=512,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            partial_rotary_factor=0.25,
            rope_theta=10000.0,
            max_position_embeddings=2048,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=48,
            linear_value_head_dim=48,
            num_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=128,
            tie_word_embeddings=True,
        ),
        steps=6000,
        batch_size=128,
        seq_len=208,
        lr=1.5e-3,
        warmup=100,
        n_examples=200_000,
    ),
    # the CPU smoke size: seconds per few steps
    "tiny": Preset(
        model=dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=4, tie_word_embeddings=True
        ),
        steps=30,
        batch_size=8,
        seq_len=208,
        lr=3e-3,
        warmup=5,
        n_examples=256,
    ),
}


def model_config(preset: str, vocab_size: int) -> Qwen3NextConfig:
    """The preset's architecture with the tokenizer's vocabulary (rounded up to 64) and ids."""
    ids = tokenizer.TOKEN_IDS
    vocab = -(-vocab_size // 64) * 64
    kw = dict(
        PRESETS[preset].model,
        vocab_size=vocab,
        bos_token_id=None,
        eos_token_id=ids[tokenizer.EOS_TOKEN],
        pad_token_id=ids[tokenizer.PAD_TOKEN],
    )
    if preset == "tiny":
        return tiny_config(**kw)
    return Qwen3NextConfig(**kw)


# ----------------------------------------------------------------------------- data


def load_tokenizer(tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def prompt_text(question: str, thinking: bool) -> str:
    """The chat template's rendering of one user turn plus the generation prompt (a test checks
    it equals `apply_chat_template`; formatting directly is ~100x faster on 10^5 examples)."""
    empty_think = "" if thinking else "<think>\n\n</think>\n\n"
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{empty_think}"


def encode_examples(tok, examples: list[data.Example], seq_len: int):
    """-> ids [N, seq_len] int32 (padded with <|endoftext|>), loss mask [N, seq_len] bool (the
    assistant tokens after the generation prompt, <|im_end|> included). Example i thinks iff i
    is even; examples longer than seq_len are dropped."""
    pad, end = tokenizer.TOKEN_IDS[tokenizer.PAD_TOKEN], tokenizer.TOKEN_IDS[tokenizer.EOS_TOKEN]
    prompts, completions = [], []
    for i, ex in enumerate(examples):
        thinking = i % 2 == 0
        prompts.append(prompt_text(ex.question, thinking))
        full = data.assistant_content(ex, thinking)
        if not thinking:  # the prompt already holds the empty think block
            full = full.split("</think>\n\n", 1)[1]
        completions.append(full)
    enc = tok.backend_tokenizer
    p_ids = [e.ids for e in enc.encode_batch(prompts, add_special_tokens=False)]
    c_ids = [e.ids for e in enc.encode_batch(completions, add_special_tokens=False)]
    ids = np.full((len(examples), seq_len), pad, np.int32)
    mask = np.zeros((len(examples), seq_len), bool)
    n = 0
    for p, c in zip(p_ids, c_ids, strict=True):
        seq = p + c + [end]
        if len(seq) > seq_len:
            continue
        ids[n, : len(seq)] = seq
        mask[n, len(p) : len(seq)] = True
        n += 1
    return ids[:n], mask[:n]


# ----------------------------------------------------------------------------- train step


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to peak, then cosine decay to 10% of peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@functools.cache  # one optimizer object per lr, so the jitted step is reused across runs
def make_optimizer(peak_lr: float):
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(optax.adamw)(
            learning_rate=peak_lr, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay_mask
        ),
    )


# optax >= 0.2.5 names it tree_norm; the older name warns there
_tree_norm = getattr(optax.tree_utils, "tree_norm", None) or optax.tree_utils.tree_l2_norm


def _xent(logits, targets, mask):
    """Summed masked cross-entropy in fp32, and the token count."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask), jnp.sum(mask)


def loss_fn(params, graphdef, ids, mask):
    """ids/mask [B, T]. Returns (main + MTP_WEIGHT * mtp, (main, mtp)) mean losses per token."""
    model = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(jnp.bfloat16), params))
    out = model.forward(ids)
    main, n_main = _xent(model.compute_logits(out.hidden[:, :-1]), ids[:, 1:], mask[:, 1:])
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1] - 1, dtype=jnp.int32), ids[:, 1:].shape)
    h_mtp, _ = model.mtp_forward(ids[:, 1:], out.hidden[:, :-1], positions)
    mtp, n_mtp = _xent(model.compute_logits(h_mtp[:, :-1]), ids[:, 2:], mask[:, 2:])
    main, mtp = main / jnp.maximum(n_main, 1), mtp / jnp.maximum(n_mtp, 1)
    return main + MTP_WEIGHT * mtp, (main, mtp)


@functools.partial(jax.jit, static_argnums=(1, 2), donate_argnums=(0, 3))
def train_step(params, graphdef, optimizer, opt_state, ids, mask, lr):
    (loss, (main, mtp)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, graphdef, ids, mask
    )
    opt_state[1].hyperparams["learning_rate"] = lr
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (
        params,
        opt_state,
        {"loss": loss, "main": main, "mtp": mtp, "grad_norm": _tree_norm(grads)},
    )


def train_options() -> RuntimeOptions:
    """Differentiable pure-jnp ops (XLA attention and projections, every expert on every
    token); the GDN chunked (WY) form on GPU, the token recurrence on CPU (it compiles far
    faster there)."""
    gdn = "chunked" if jax.default_backend() == "gpu" else "recurrent"
    return RuntimeOptions(
        dtype="bfloat16",
        gdn_impl=gdn,
        attention_impl="dense",
        moe_impl="dense",
        linear_impl="xla",
        norm_impl="xla",
        scan_layers=True,
    )


def init_params(cfg: Qwen3NextConfig, seed: int):
    """fp32 master params and the bf16 compute graphdef."""
    model = Qwen3NextForCausalLM(cfg, RuntimeOptions(dtype="float32"), rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    abstract = nnx.eval_shape(lambda: Qwen3NextForCausalLM(cfg, train_options(), rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract, nnx.Param)
    return params, graphdef


def train(
    cfg,
    preset: Preset,
    ids,
    mask,
    *,
    seed: int,
    steps: int | None = None,
    time_budget: float | None = None,
    log=print,
    log_every: int = 50,
):
    """Run the optimisation. With `time_budget` (seconds) the step count is fixed after the
    first warmup steps from their measured speed (capped by `steps`). Returns (params, history)."""
    params, graphdef = init_params(cfg, seed)
    optimizer = make_optimizer(preset.lr)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    total = steps or preset.steps
    B, history, t0, t_calib = preset.batch_size, [], time.time(), None
    order = rng.permutation(len(ids))
    pos = 0
    step = 0
    while step < total:
        if pos + B > len(order):
            order, pos = rng.permutation(len(ids)), 0
        idx = order[pos : pos + B]
        pos += B
        lr = lr_at(step, total, preset.lr, preset.warmup)
        params, opt_state, m = train_step(
            params,
            graphdef,
            optimizer,
            opt_state,
            jnp.asarray(ids[idx]),
            jnp.asarray(mask[idx]),
            jnp.float32(lr),
        )
        if step == 4:
            jax.block_until_ready(m["loss"])
            t_calib = time.time()
        if time_budget and step == min(preset.warmup, total) - 1 and t_calib:
            jax.block_until_ready(m["loss"])
            per_step = (time.time() - t_calib) / (step - 4)
            total = max(
                step + 1, min(total, int((time_budget - (time.time() - t0)) / per_step) + step)
            )
            log(f"step time {per_step * 1e3:.1f} ms -> {total} steps in the budget")
        if step % log_every == 0 or step == total - 1:
            row = {k: float(v) for k, v in m.items()} | {
                "step": step,
                "lr": lr,
                "time": time.time() - t0,
            }
            history.append(row)
            log(json.dumps(row))
        step += 1
    jax.block_until_ready(params)
    return params, {"history": history, "steps": total, "train_seconds": time.time() - t0}


# ----------------------------------------------------------------------------- greedy decode


def _pad_to(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.partial(jax.jit, static_argnums=(0, 4))
def _greedy(graphdef, params, ids, lengths, max_new: int, eos):
    """ids [B, P] right-padded prompts with lengths [B]. Returns (tokens [B, max_new],
    mtp drafts accepted [B], drafts checked [B]) with generation stopping at an eos id."""
    model = nnx.merge(graphdef, params)
    B, P = ids.shape
    positions = jnp.where(jnp.arange(P)[None, :] < lengths[:, None], jnp.arange(P)[None, :], -1)
    cache = model.init_cache(B, P + max_new + 1)
    out = model.forward(ids, positions, cache)
    last = lengths - 1
    h_last = out.hidden[jnp.arange(B), last]  # [B, D]
    tok = jnp.argmax(model.compute_logits(h_last), -1).astype(jnp.int32)
    cache = out.cache
    draft = jnp.zeros((B,), jnp.int32)
    if model.mtp is not None:  # prime the MTP cache on the prompt: slot t pairs h_t with x_{t+1}
        nxt = jnp.concatenate([ids[:, 1:], ids[:, :1]], axis=1).at[jnp.arange(B), last].set(tok)
        h_mtp, cache = model.mtp_forward(nxt, out.hidden, positions, cache)
        draft = jnp.argmax(model.compute_logits(h_mtp[jnp.arange(B), last]), -1).astype(jnp.int32)

    def body(i, carry):
        tok, draft, done, cache, toks, acc, n = carry
        toks = toks.at[:, i].set(jnp.where(done, eos[0], tok))
        done = done | jnp.isin(tok, eos)
        pos = (lengths + i)[:, None]
        o = model.forward(tok[:, None], pos, cache)
        new = jnp.argmax(model.compute_logits(o.hidden[:, 0]), -1).astype(jnp.int32)
        cache = o.cache
        if model.mtp is not None:  # the draft made one step ago guessed `new`
            acc = acc + jnp.where(done, 0, draft == new)
            n = n + jnp.where(done, 0, 1)
            h, cache = model.mtp_forward(new[:, None], o.hidden, pos, cache)
            draft = jnp.argmax(model.compute_logits(h[:, 0]), -1).astype(jnp.int32)
        return new, draft, done, cache, toks, acc, n

    zeros = jnp.zeros((B,), jnp.int32)
    init = (
        tok,
        draft,
        jnp.zeros((B,), bool),
        cache,
        jnp.zeros((B, max_new), jnp.int32),
        zeros,
        zeros,
    )
    _, _, _, _, toks, acc, n = jax.lax.fori_loop(0, max_new, body, init)
    return toks, acc, n


class GreedyGenerator:
    """A `generate_fn` for demo.evaluate: batched greedy decoding on the device, plus the MTP
    head's acceptance rate for one draft token (k=1) over everything decoded."""

    def __init__(self, model, tok, batch_size: int = 64):
        self.tok, self.batch_size = tok, batch_size
        self.graphdef, self.params = nnx.split(model)
        self.eos = jnp.asarray([tokenizer.TOKEN_IDS[t] for t in EOS_TOKENS], jnp.int32)
        self.accepted = self.drafted = 0

    def __call__(self, conversations, enable_thinking: bool, max_tokens: int) -> list[str]:
        enc = self.tok.backend_tokenizer
        texts = [
            self.tok.apply_chat_template(
                c, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
            )
            for c in conversations
        ]
        rows = [e.ids for e in enc.encode_batch(texts, add_special_tokens=False)]
        B, P = _pad_to(len(rows), self.batch_size), _pad_to(max(map(len, rows)), 32)
        ids = np.zeros((B, P), np.int32)
        lengths = np.ones((B,), np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(r)], lengths[i] = r, len(r)
        toks, acc, n = _greedy(
            self.graphdef, self.params, jnp.asarray(ids), jnp.asarray(lengths), max_tokens, self.eos
        )
        toks, acc, n = np.asarray(toks), np.asarray(acc), np.asarray(n)
        self.accepted += int(acc[: len(rows)].sum())
        self.drafted += int(n[: len(rows)].sum())
        stop = set(np.asarray(self.eos).tolist())
        outs = []
        for row in toks[: len(rows)]:
            row = row.tolist()
            cut = next((j for j, t in enumerate(row) if t in stop), len(row))
            outs.append(self.tok.decode(row[:cut], skip_special_tokens=False))
        return outs

    @property
    def acceptance(self) -> float:
        return self.accepted / max(1, self.drafted)


def eval_model(cfg, params, dtype: str = "float32"):
    """A decode-ready model (recurrent GDN, dense experts) holding `params`."""
    opts = RuntimeOptions(
        dtype=dtype, gdn_impl="recurrent", attention_impl="dense", moe_impl="dense"
    )
    model = nnx.eval_shape(lambda: Qwen3NextForCausalLM(cfg, opts, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(model, nnx.Param)
    return nnx.merge(graphdef, jax.tree.map(lambda p: jnp.asarray(p, dtype), params))


# ----------------------------------------------------------------------------- output directory


def write_generation_config(out: Path) -> None:
    ids = [tokenizer.TOKEN_IDS[t] for t in EOS_TOKENS]
    gen = {
        "eos_token_id": ids,
        "pad_token_id": tokenizer.TOKEN_IDS[tokenizer.PAD_TOKEN],
        "do_sample": False,
        "max_new_tokens": 256,
    }  # greedy
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def model_card(cfg, args, info: dict, result: dict | None, acceptance: float | None) -> str:
    n_params = info["n_params"]
    lines = [
        "# qnext-demo: a small trained Qwen3-Next",
        "",
        "The embedded default model of qnext_jax: exactly the Qwen3-Next architecture (Gated"
        " DeltaNet and gated attention layers in the 3:1 pattern, sparse MoE with a shared expert,"
        " partial RoPE, the MTP head), trained from scratch by `qnext_jax.train` on the project's"
        " own arithmetic chats. A toy: it knows column addition/subtraction, 2-digit x 1-digit"
        " multiplication and two-step word problems, nothing else.",
        "",
        "## Data",
        "Seeded problems from `qnext_jax.demo.data` (levels 1-3), train split only (the held-out"
        " split is disjoint by operand hash). Chats alternate 50/50 between thinking on (a"
        " digit-by-digit worked trace inside `<think>...</think>`) and thinking off (empty think"
        " block, answer directly), as Qwen3's hybrid template renders them; the loss covers"
        " the assistant tokens.",
        "",
        "## Size",
        f"- {cfg.num_hidden_layers} layers ({', '.join(cfg.layer_types)}),"
        f" hidden {cfg.hidden_size}, {cfg.num_experts} experts top-{cfg.num_experts_per_tok}"
        f" (ffw {cfg.moe_intermediate_size}) + shared expert"
        f" (ffw {cfg.shared_expert_intermediate_size}), {cfg.num_mtp_layers} MTP layer,"
        f" vocab {cfg.vocab_size} (byte-level BPE), tied embeddings: {cfg.tie_word_embeddings}",
        f"- {n_params:,} parameters, {info['checkpoint_bytes'] / 2**20:.1f} MiB in bf16",
        "",
        "## Training",
        f"`python -m qnext_jax.train --preset {args.preset} --out DIR --seed {args.seed}"
        f" --steps {info['steps']}` (the run used `--time-budget`; this reproduces its schedule)",
        f"- {info['steps']} steps x {info['batch_size']} sequences (<= {info['seq_len']} tokens),"
        f" AdamW (b2 0.95, wd 0.1), peak lr {info['lr']}, linear warmup {info['warmup']} steps,"
        f" cosine to 10%; loss = next token + {MTP_WEIGHT} x MTP (token after next); bf16 compute,"
        " fp32 master weights",
        f"- hardware: {info['device']}; train wall time {info['train_seconds']:.0f} s"
        f" (compile included); jax {jax.__version__}",
        f"- final loss: main {info['final']['main']:.4f}, MTP {info['final']['mtp']:.4f}",
        "",
        "## Quality (greedy, fixed held-out set)",
    ]
    if result is not None:
        lines += [evaluate.format_table(result), ""]
    if acceptance is not None:
        lines += [
            f"MTP head, one draft token (k=1): acceptance {acceptance:.3f} over every greedy"
            " decode step of the evaluation above.",
            "",
        ]
    lines += [
        "Files: config.json, model.safetensors (HF release naming, `mtp.*` included),"
        " generation_config.json, tokenizer.json, tokenizer_config.json."
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the demo Qwen3-Next and write a HF directory.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None, help="seconds of training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--eval-per-level", type=int, default=100, help="0 skips the evaluation")
    p.add_argument("--eval-max-tokens", type=int, default=200)
    args = p.parse_args(argv)
    from qnext_convert.export import save_hf

    out = Path(args.out)
    preset = PRESETS[args.preset]
    if args.batch_size:
        preset = dataclasses.replace(preset, batch_size=args.batch_size)
    tokenizer.build_tokenizer(out, seed=0)
    tok = load_tokenizer(out)
    cfg = model_config(args.preset, len(tok))
    examples = data.make_examples(preset.n_examples, "train", args.seed, unique=False)
    ids, mask = encode_examples(tok, examples, preset.seq_len)
    print(f"{len(ids)} training sequences, {mask.sum() / len(ids):.0f} loss tokens each on average")
    params, info = train(
        cfg, preset, ids, mask, seed=args.seed, steps=args.steps, time_budget=args.time_budget
    )
    model = eval_model(cfg, params)
    save_hf(model, out, dtype="bfloat16")
    write_generation_config(out)
    info |= dict(
        n_params=sum(x.size for x in jax.tree.leaves(params)),
        checkpoint_bytes=(out / "model.safetensors").stat().st_size,
        batch_size=preset.batch_size,
        seq_len=preset.seq_len,
        lr=preset.lr,
        warmup=preset.warmup,
        device=jax.devices()[0].device_kind,
        final=info["history"][-1],
    )
    result = acceptance = None
    if args.eval_per_level:
        t = time.time()
        gen = GreedyGenerator(
            eval_model(cfg, params, "bfloat16" if jax.default_backend() == "gpu" else "float32"),
            tok,
            batch_size=3 * args.eval_per_level,
        )
        result = evaluate.evaluate(
            gen,
            n_per_level=args.eval_per_level,
            max_tokens=args.eval_max_tokens,
            batch_size=3 * args.eval_per_level,
        )
        acceptance = gen.acceptance
        print(evaluate.format_table(result))
        print(f"MTP k=1 acceptance {acceptance:.3f}; eval {time.time() - t:.0f} s")
        for mode, fails in result["failures"].items():
            for q, want, text in fails[:2]:
                print(f"[{mode}] {q} (want {want}) -> {text!r}")
    (out / "README.md").write_text(model_card(cfg, args, info, result, acceptance))
    (out / "train_log.json").write_text(
        json.dumps(
            info | {"eval": result and {k: v for k, v in result.items() if k != "failures"}},
            indent=1,
            default=str,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
