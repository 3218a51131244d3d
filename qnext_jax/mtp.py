"""The native multi-token-prediction (MTP) head.

Fed with the main model's post-final-norm hidden state h_t and the embedding of token t+1:
  x = fc([pre_fc_norm_embedding(embed(x_{t+1})) | pre_fc_norm_hidden(h_t)])
      (order: embedding first)
  x = full-attention decoder layer(s) (MoE, own KV cache) at position t
  h = norm(x);  logits = lm_head(h)  (embedding and lm_head shared with the main model)
For more than one draft step the same layer is reused on its own output and its own draft.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from qnext_jax.cache import LayerCache
from qnext_jax.config import FULL, Qwen3NextConfig, RuntimeOptions
from qnext_jax.layers import Linear, RMSNorm


class MultiTokenPredictor(nnx.Module):
    def __init__(self, cfg: Qwen3NextConfig, opts: RuntimeOptions, *, dtype, rngs):
        from qnext_jax.model import DecoderLayer

        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.pre_fc_norm_embedding = RMSNorm(D, eps, dtype=dtype, opts=opts)
        self.pre_fc_norm_hidden = RMSNorm(D, eps, dtype=dtype, opts=opts)
        self.fc = Linear(2 * D, D, dtype=dtype, rngs=rngs, axes=(None, "embed"), opts=opts)
        self.layers = nnx.List(
            [
                DecoderLayer(cfg, opts, (FULL, cfg.is_moe_layer(i)), dtype=dtype, rngs=rngs)
                for i in range(cfg.num_mtp_layers)
            ]
        )
        self.norm = RMSNorm(D, eps, dtype=dtype, opts=opts)

    def __call__(self, embeds, hidden, rope, positions, cache, slots=None):
        """embeds [B,T,D] of the next tokens, hidden [B,T,D] post-norm main-model states,
        cache: KVCache stacked over MTP layers [n, B, S, ...] or None.
        Returns (post-norm MTP hidden [B,T,D], new cache)."""
        e = self.pre_fc_norm_embedding(embeds)
        h = self.pre_fc_norm_hidden(hidden.astype(embeds.dtype))
        x = self.fc(jnp.concatenate([e, h], axis=-1))
        stream = (x, jnp.zeros_like(x))  # (residual stream, pending block output)
        for i, layer in enumerate(self.layers):
            c = None if cache is None else LayerCache(cache, i)
            stream, c, _ = layer(stream, rope, positions, c, slots)
            cache = None if c is None else c.stack
        return self.norm(stream[1], residual=stream[0])[0], cache
