"""The offline API in the shape of vLLM's: `LLM(model).generate(prompts, SamplingParams(...))`
and `LLM.chat(messages, ...)`. Also where the embedded default model is found."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import jax

from qnext_jax.chat import ReasoningStream, render_chat, split_reasoning, starts_in_reasoning
from qnext_jax.config import RuntimeOptions
from qnext_jax.engine import Engine, EngineConfig, Request, check_memory
from qnext_jax.sampling import SamplingParams

log = logging.getLogger("qnext_jax")
DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"
ALLOW_LONG_ENV = "QNEXT_ALLOW_LONG_MAX_MODEL_LEN"


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    reasoning: str | None = None
    content: str | None = None  # text without the reasoning (chat), else == text
    spec_decode: SpecDecodeStats | None = None


@dataclasses.dataclass
class SpecDecodeStats:
    """MTP speculative decoding counts for one request."""

    num_draft_tokens: int  # drafted
    num_accepted_tokens: int  # accepted
    accepted_per_position: list[int]

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        steps = self.num_draft_tokens // max(len(self.accepted_per_position), 1)
        return [a / steps if steps else 0.0 for a in self.accepted_per_position]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify step (accepted drafts + the one the target adds)."""
        steps = self.num_draft_tokens // max(len(self.accepted_per_position), 1)
        return 1.0 + self.num_accepted_tokens / steps if steps else 0.0


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    def decode_tokens_per_s(self, n_tokens: int) -> float | None:
        if self.first_token_time is None or self.finish_time is None or n_tokens < 2:
            return None
        dt = self.finish_time - self.first_token_time
        return (n_tokens - 1) / dt if dt > 0 else None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics

    # the first completion's fields, for convenience
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def reasoning(self) -> str | None:
        return self.outputs[0].reasoning


class LLM:
    """A model, its tokenizer and a generation engine.

    model: an HF directory, a converted directory, or None for the embedded default.
    load_format: "auto" (the directory's weights) or "dummy" (random weights of the geometry in
    its config.json, drawn directly into their shards: for benchmarks).
    attention_replicas: copies of the attention and GDN weights over the tensor_parallel_size
    GPUs (their heads split over tensor_parallel_size / attention_replicas GPUs; the experts
    and the vocabulary always split over all). Equal to tensor_parallel_size, each layer needs
    one all-reduce (the experts') instead of two, and every GPU reads every attention weight."""

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        tokenizer: str | os.PathLike | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 8,
        tensor_parallel_size: int = 1,
        attention_replicas: int = 1,
        speculative_config: dict | str | None = None,
        seed: int = 0,
        prefill_chunk: int = 512,
        decode_block: int = 16,
        gpu_memory_utilization: float = 0.9,
        allow_long_max_model_len: bool | None = None,
        options: RuntimeOptions | None = None,
        load_format: str = "auto",
    ):
        from transformers import AutoTokenizer

        from qnext_jax.loading import from_pretrained, model_config

        self.model_path = Path(model) if model is not None else default_model_dir()
        if dtype == "auto":
            dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
        num_spec = parse_speculative_config(speculative_config)
        options = options or RuntimeOptions()
        shardings_fn = mesh = None
        if tensor_parallel_size != 1 or attention_replicas != 1:
            from qnext_jax import sharding

            cfg = model_config(self.model_path, load_format)
            mesh = sharding.make_mesh(
                cfg, tensor_parallel_size, attention_replicas=attention_replicas
            )
            options = dataclasses.replace(options, mesh=mesh)
            shardings_fn = functools.partial(sharding.param_shardings, mesh=mesh, cfg=cfg)
        self.model = from_pretrained(
            self.model_path,
            dtype,
            options=options,
            shardings_fn=shardings_fn,
            progress=False,
            load_format=load_format,
            seed=seed,
        )
        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer or self.model_path, local_files_only=True
        )
        self.generation_config = _read_json(self.model_path / "generation_config.json")
        cfg = self.model.config
        max_model_len = max_model_len or min(cfg.max_position_embeddings, 4096)
        allow_long = allow_long_max_model_len
        if allow_long is None:
            allow_long = os.environ.get(ALLOW_LONG_ENV, "0") not in ("0", "", "false")
        if max_model_len > cfg.max_position_embeddings and not allow_long:
            raise ValueError(
                f"max_model_len={max_model_len} is above the checkpoint's max_position_embeddings="
                f"{cfg.max_position_embeddings}; pass allow_long_max_model_len=True (or set "
                f"{ALLOW_LONG_ENV}=1) if you know the model extrapolates"
            )
        self.engine_config = EngineConfig(
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            prefill_chunk=prefill_chunk,
            decode_block=decode_block,
            seed=seed,
            num_speculative_tokens=num_spec,
        )
        if num_spec and self.model.mtp is None:
            raise ValueError(
                f"speculative_config: {self.model_path} has no MTP layers (no mtp.* tensors)"
            )
        param_bytes = sum(x.nbytes for x in jax.tree.leaves(self.model))
        check_memory(cfg, self.engine_config, param_bytes, utilization=gpu_memory_utilization)
        self.eos_ids = eos_token_ids(self.generation_config, cfg, self.tokenizer)
        self.engine = Engine(
            self.model,
            self.engine_config,
            eos_ids=self.eos_ids,
            detokenize=self._detokenize,
            defaults=self.generation_config,
            mesh=mesh,
        )

    # ---- tokenizer helpers -----------------------------------------------------------------
    def _detokenize(self, ids: list[int], params: SamplingParams) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: at least one token is required")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("a token-id prompt must be a list of ints")
        return list(prompt)

    def default_params(self) -> SamplingParams:
        return SamplingParams().resolved(self.generation_config)

    # ---- generation ----------------------------------------------------------------------
    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for a prompt (a string or a token-id list) or a list of them."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        )
        prompts = [prompts] if single else list(prompts)
        reqs = self._submit(prompts, sampling_params, [False] * len(prompts))
        while self.engine.has_work():
            self.engine.step()
        return [
            self._output(r, p, in_reasoning=False, chat=False)
            for r, p in zip(reqs, prompts, strict=True)
        ]

    def chat(
        self,
        messages,
        sampling_params=None,
        *,
        chat_template_kwargs: dict | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """messages: one conversation (a list of {'role', 'content'}) or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [render_chat(self.tokenizer, c, chat_template_kwargs) for c in convs]
        opened = [starts_in_reasoning(p) for p in prompts]
        reqs = self._submit(prompts, sampling_params, opened)
        while self.engine.has_work():
            self.engine.step()
        return [
            self._output(r, p, in_reasoning=o, chat=True)
            for r, p, o in zip(reqs, prompts, opened, strict=True)
        ]

    def stream(
        self, prompt, sampling_params=None, *, chat_template_kwargs=None, chat: bool = False
    ) -> Iterator[tuple[str, str, RequestOutput | None]]:
        """Yield (reasoning_delta, content_delta, None) as tokens arrive; the last item carries
        the final RequestOutput. Same tokens as generate()."""
        text_prompt = render_chat(self.tokenizer, prompt, chat_template_kwargs) if chat else prompt
        opened = chat and starts_in_reasoning(text_prompt)
        (req,) = self._submit([text_prompt], sampling_params, [opened])
        splitter = ReasoningStream(opened) if chat else None
        sent = ""
        while not req.finished:
            self.engine.step()
            text = self._final_text(req)
            delta, sent = text[len(sent) :], text
            if delta:
                r, c = splitter.feed(delta) if splitter else ("", delta)
                yield r, c, None
        r, c = splitter.feed("", final=True) if splitter else ("", "")
        yield r, c, self._output(req, text_prompt, in_reasoning=opened, chat=chat)

    def _submit(self, prompts, sampling_params, opened) -> list[Request]:
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError(
                    f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts"
                )
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        params = [p.resolved(self.generation_config) for p in params]
        ids = [self.encode(p) for p in prompts]
        for i, p in zip(ids, params, strict=True):
            self.engine.validate(i, p)  # all or nothing: no request is queued if one is bad
        return [self.engine.add_request(i, p) for i, p in zip(ids, params, strict=True)]

    def _final_text(self, req: Request) -> str:
        if isinstance(req.stop_reason, str):
            return req.text  # already cut at the stop string
        ids = req.output_ids
        if req.finish_reason == "stop" and not req.params.include_stop_str_in_output:
            ids = ids[:-1]  # the EOS / stop token itself is not text
        return self._detokenize(ids, req.params)

    def _output(self, req: Request, prompt, *, in_reasoning: bool, chat: bool) -> RequestOutput:
        text = self._final_text(req)
        reasoning, content = split_reasoning(text, in_reasoning) if chat else (None, text)
        spec = None
        if self.engine.k:
            spec = SpecDecodeStats(
                req.spec_steps * self.engine.k, sum(req.spec_accepted), list(req.spec_accepted)
            )
        comp = CompletionOutput(
            0,
            text,
            list(req.output_ids),
            req.finish_reason,
            req.stop_reason,
            reasoning,
            content,
            spec,
        )
        metrics = RequestMetrics(
            req.arrival, req.first_token_time, req.finish_time or time.perf_counter()
        )
        return RequestOutput(
            req.request_id,
            prompt if isinstance(prompt, str) else None,
            req.prompt_ids,
            [comp],
            req.finished,
            metrics,
        )


def add_engine_args(ap) -> None:
    """The model and engine flags `python -m qnext_jax.generate` and `python -m qnext_jax.serve`
    share (vLLM's names); `engine_kwargs` turns them into LLM(...) arguments."""
    ap.add_argument(
        "--model", default=None, help="HF or converted model directory (default: embedded demo)"
    )
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=8, help="sequence slots (the batch)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument(
        "--attention-replicas",
        type=int,
        default=1,
        help="copies of the attention / GDN weights across the GPUs (their heads split over "
        "tensor-parallel-size / attention-replicas GPUs; experts split over all)",
    )
    ap.add_argument(
        "--speculative-config",
        type=json.loads,
        default=None,
        help='JSON, e.g. \'{"method":"qwen3_next_mtp","num_speculative_tokens":2}\'',
    )
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"])
    ap.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "dummy"],
        help="dummy: random weights of the --model config's geometry (benchmarks)",
    )
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--decode-block", type=int, default=16, help="decode steps per device call")


ENGINE_ARGS = (
    "dtype",
    "max_model_len",
    "max_num_seqs",
    "tensor_parallel_size",
    "attention_replicas",
    "speculative_config",
    "load_format",
    "gpu_memory_utilization",
    "decode_block",
)


def engine_kwargs(args) -> dict:
    """LLM keyword arguments from flags added by `add_engine_args` (the model path apart)."""
    return {name: getattr(args, name) for name in ENGINE_ARGS}


def parse_speculative_config(config: dict | str | None) -> int:
    """vLLM's --speculative-config -> number of MTP draft tokens (0: off)."""
    if config is None:
        return 0
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config is not valid JSON: {config!r} ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"speculative_config must be a JSON object, got {config!r}")
    method = config.get("method", "qwen3_next_mtp")
    if method not in ("qwen3_next_mtp", "mtp"):
        raise ValueError(f"speculative_config.method={method!r}; allowed: 'qwen3_next_mtp', 'mtp'")
    k = config.get("num_speculative_tokens", 1)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 4:
        raise ValueError(f"speculative_config.num_speculative_tokens={k!r}; allowed: 1..4")
    return k


def eos_token_ids(generation_config: dict, cfg, tokenizer) -> list[int]:
    """Every EOS id: generation_config.json (may list several), config.json, the tokenizer."""
    ids = []
    for source in (generation_config.get("eos_token_id"), cfg.eos_token_id, tokenizer.eos_token_id):
        if source is None:
            continue
        ids += list(source) if isinstance(source, (list, tuple)) else [source]
    return list(dict.fromkeys(int(i) for i in ids))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def default_model_dir() -> Path:
    """The shipped demo checkpoint, or (until one exists) a random-weight model built once."""
    if (DEMO_MODEL_DIR / "config.json").exists():
        return DEMO_MODEL_DIR
    from qnext_jax.random_model import random_demo_checkpoint

    path = random_demo_checkpoint()
    log.warning(
        "no trained demo checkpoint in the package: using a random-weight Qwen3-Next at %s", path
    )
    print(
        f"[qnext_jax] no model given and no trained demo checkpoint: using a small RANDOM-weight "
        f"Qwen3-Next with the demo tokenizer ({path})",
        flush=True,
    )
    return path
