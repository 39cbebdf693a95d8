"""The pico-decoder: a LLaMA-style decoder-only transformer.

Pre-norm residual blocks of grouped-query attention and a SwiGLU MLP, RMSNorm computed in
float32, rotary position embeddings on interleaved pairs, untied input and output embeddings,
no biases. Module names and initialisation are pico-train's, so a run here is the same model as
the published pico-decoder suite and pico-analyze finds the layers it looks for.

A model variant lives here alone: its class beside the others and a ModelConfig field that picks
it. The rest of the trainer reads the model's own module names, tensor shapes and fields. A field
at a value other than its default is one transformers' Llama cannot express, and the checkpoints
are then saved in pico's own format (checkpoint.export_hf); an export to another transformers
architecture is checkpoint.py's to learn (docs/forking.md).

Core, the first file of the reading path (README): ModelConfig to PicoDecoder.forward. Machinery
for analysis and sampling: with_attention, residual_stream, KVCache and generate.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(slots=True)
class ModelConfig:
    d_model: int = 768
    n_layers: int = 12
    attention_n_heads: int = 12
    attention_n_kv_heads: int = 4
    activation_hidden_dim: int = 3072
    vocab_size: int = 50304
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    position_emb_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attention_n_heads

    def problems(self) -> list[str]:
        """What makes this shape impossible, as 'key=value: expected ...' strings."""
        found = []
        for name in ("d_model", "n_layers", "attention_n_heads", "attention_n_kv_heads",
                     "activation_hidden_dim", "vocab_size", "max_seq_len"):
            if getattr(self, name) < 1:
                found.append(f"model.{name}={getattr(self, name)}: expected a positive integer")
        if found:
            return found
        if self.d_model % self.attention_n_heads:
            found.append(f"model.d_model={self.d_model}: expected a multiple of "
                         f"model.attention_n_heads={self.attention_n_heads}")
        elif self.head_dim % 2:
            found.append(f"model.d_model={self.d_model}: expected d_model / attention_n_heads "
                         f"to be even (RoPE rotates pairs), got {self.head_dim}")
        if self.attention_n_heads % self.attention_n_kv_heads:
            found.append(f"model.attention_n_heads={self.attention_n_heads}: expected a multiple "
                         f"of model.attention_n_kv_heads={self.attention_n_kv_heads}")
        return found


# The linear layers whose learning dynamics every checkpoint captures in each layer, by the end
# of their module names (pico-train's default; checkpointing.learning_dynamics.layer_suffixes).
CAPTURED_BY_DEFAULT = ["attention.v_proj", "attention.o_proj", "swiglu.w_2"]

# The pico-decoder suite (pico-train's recipe): only the width changes.
SUITE = {
    "tiny": dict(d_model=96, activation_hidden_dim=384),
    "small": dict(d_model=384, activation_hidden_dim=1536),
    "medium": dict(d_model=768, activation_hidden_dim=3072),
    "large": dict(d_model=1536, activation_hidden_dim=6144),
    "xl": dict(d_model=2304, activation_hidden_dim=9216),  # 1.17B: the 1B end of the range
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 even under bf16 autocast: the mean of squares loses too much
        # precision in bf16. Cast back before the weight, as pico-train and transformers do, and
        # return x's dtype: the residual stream's float32 here, and bf16 for a bf16 input (a
        # variant's per-head q/k norm under autocast), which the float32 weight would otherwise
        # promote to float32 beside a bf16 v. For a float32 x the last cast does nothing.
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight).type_as(x)


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of the rotation angles, [max_seq_len, head_dim], float32, laid out
    for interleaved pairs: cos = (c0, c0, c1, c1, ...), sin = (-s0, s0, -s1, s1, ...)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.position_emb_theta ** (torch.arange(0, d, 2).float() / d))
    angles = torch.outer(torch.arange(config.max_seq_len).float(), inv_freq)
    cos = angles.cos().repeat_interleave(2, dim=-1)
    sin = torch.stack((-angles.sin(), angles.sin()), dim=-1).flatten(-2)
    return cos, sin


def apply_rope(x, cos, sin):
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of x [B, heads, T, head_dim] by angle i:
    (x0 c - x1 s, x1 c + x0 s). Real arithmetic on whole rows rather than complex tensors or
    stride-2 views, so torch.compile builds one graph and eager mode makes no strided copies;
    float32, as pico-train computes it, so bf16 positions far into the sequence stay accurate."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return (xf * cos + swapped * sin).type_as(x)


class KVCache:
    """Keys and values of the tokens seen so far, one (k, v) pair per layer."""

    def __init__(self, n_layers: int):
        self.layers: list = [None] * n_layers

    @property
    def seq_len(self) -> int:
        return 0 if self.layers[0] is None else self.layers[0][0].shape[2]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.attention_n_heads
        self.n_kv_heads = config.attention_n_kv_heads
        self.head_dim = config.head_dim
        d = config.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def project(self, x, cos, sin):
        """Queries, keys and values of x, RoPE applied to q and k. Heads first, [B, heads, T,
        head_dim]: the layout SDPA works in, so RoPE writes q and k contiguous in it and the kernel
        needs no copy."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def probabilities(self, x, cos, sin):
        """The attention probabilities [B, heads, T, T] (float32) of x without a cache: what SDPA
        computes inside its fused kernel and never stores, written out for analysis. Query head h
        reads KV head h // (heads / KV heads), as enable_gqa maps them."""
        q, k, _ = self.project(x, cos, sin)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        with torch.autocast(x.device.type, enabled=False):  # float32 scores, even under bf16 autocast
            scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(self.head_dim)
        T = x.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, -math.inf).softmax(dim=-1)

    def forward(self, x, cos, sin, kv_cache=None, layer_idx=0):
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)

        n_past = 0
        if kv_cache is not None:
            past = kv_cache.layers[layer_idx]
            if past is not None:
                n_past = past[0].shape[2]
                k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
            kv_cache.layers[layer_idx] = (k, v)

        # enable_gqa: each KV head serves its group of query heads inside the kernel, with no
        # copy of K and V (flash attention supports it; other kernels fall back to math).
        gqa = self.n_kv_heads != self.n_heads
        if n_past == 0:
            # No mask tensor: is_causal lets SDPA pick the flash kernel.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif T == 1:
            # One new token attends to everything cached: no mask at all.
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:
            # Several new tokens after a cache: is_causal would align the mask top-left, so
            # build the bottom-right causal mask explicitly.
            mask = torch.ones(T, n_past + T, dtype=torch.bool, device=x.device).tril(n_past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w_0 = nn.Linear(config.d_model, config.activation_hidden_dim, bias=False)  # gate
        self.w_1 = nn.Linear(config.d_model, config.activation_hidden_dim, bias=False)  # up
        self.w_2 = nn.Linear(config.activation_hidden_dim, config.d_model, bias=False)  # down

    def forward(self, x):
        return self.w_2(F.silu(self.w_0(x)) * self.w_1(x))


class PicoDecoderBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = Attention(config)
        self.swiglu_norm = RMSNorm(config.d_model, config.norm_eps)
        self.swiglu = SwiGLU(config)

    def forward(self, x, cos, sin, kv_cache=None, layer_idx=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, kv_cache, layer_idx)
        return x + self.swiglu(self.swiglu_norm(x))


# Float32 logits the loss holds at once: 2**26 (256 MiB) is 1,334 tokens at a 50,304-token vocabulary,
# and all 8,192 tokens of the demo's batch (32 x 256) at its vocabulary of 257. Larger chunks keep the products efficient on a CPU too.
LOGITS_PER_CHUNK = 2 ** 26


class OutputHead(nn.Linear):
    """The de-embedding, d_model -> vocab, no bias: the logits of x; or, given labels, their
    cross-entropy, computed a chunk of tokens at a time, so that a batch's logits never exist whole
    (16 rows of 2,048 tokens of a 50,304 vocabulary would be 6.6 GB in float32, and as much again
    for their log-softmax). A module of its own, so that FSDP gathers its weight around this call."""

    def forward(self, x, labels=None, reduction: str = "mean"):
        if labels is None:
            return super().forward(x)
        h, targets = x.flatten(0, -2), labels.flatten()
        rows = max(1, LOGITS_PER_CHUNK // self.out_features)
        if reduction != "none" and torch.is_grad_enabled() and (h.requires_grad or self.weight.requires_grad):
            return FusedCrossEntropy.apply(h, self.weight, targets, rows, reduction == "mean")
        # Without a gradient to keep (evaluation), or per token: each chunk's losses in turn
        losses = torch.cat([F.cross_entropy(F.linear(h[i:i + rows], self.weight).float(), targets[i:i + rows],
                                            reduction="none") for i in range(0, len(h), rows)])
        if reduction == "none":
            return losses.view(labels.shape)
        total = losses.sum()
        return total / (targets != -100).sum() if reduction == "mean" else total


class FusedCrossEntropy(torch.autograd.Function):
    """The cross-entropy of the logits h @ weight.T against targets (-100 ignored): their mean, or
    their sum, in float32, and its gradients, computed in the forward pass chunk by chunk. Autograd
    would keep each chunk's logits for the backward; here a chunk's logits become its gradient in
    place (d loss / d logits = softmax - one_hot(target)) and go straight into the two products
    that the backward needs, so only d loss / d h and d loss / d weight are kept. The backward
    scales them by the gradient of the loss (1 / accumulation steps in training)."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows: int, mean: bool):
        valid = targets != -100
        scale = valid / valid.sum() if mean else valid.float()  # each token's share of the loss
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h, grad_weight = torch.empty_like(h), None
        for i in range(0, len(h), rows):
            h_i, target, share = h[i:i + rows], targets[i:i + rows].clamp(min=0)[:, None], scale[i:i + rows, None]
            logits = F.linear(h_i, weight)  # bf16 under autocast, as the model's other products
            z = logits.float()  # float32 for the softmax: bf16 would round the loss the model is graded on
            # The softmax in z's own memory, a pass or two at a time (logsumexp would copy it whole)
            target_logit, largest = z.gather(1, target), z.amax(dim=-1, keepdim=True)
            exp = z.sub_(largest).exp_()
            exp_sum = exp.sum(dim=-1, keepdim=True)
            total += ((exp_sum.log() + largest - target_logit) * share).sum()
            grad = exp.mul_(share / exp_sum).scatter_add_(1, target, -share).to(logits.dtype)
            grad_h[i:i + rows] = grad @ weight
            product = (grad.t() @ h_i).float()  # summed over the chunks in float32
            grad_weight = product if grad_weight is None else grad_weight.add_(product)
        ctx.save_for_backward(grad_h, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_weight = ctx.saved_tensors  # this function's own: scaled in place
        return grad_h.mul_(grad_loss), grad_weight.mul_(grad_loss).to(ctx.weight_dtype), None, None, None


class PicoDecoder(nn.Module):
    # Parameters keep PyTorch's default initialisation (nn.Linear: Kaiming-uniform, nn.Embedding:
    # N(0, 1), norms: 1), exactly as pico-train builds the published suite.
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding_proj = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(PicoDecoderBlock(config) for _ in range(config.n_layers))
        self.output_norm = RMSNorm(config.d_model, config.norm_eps)
        self.de_embedding_proj = OutputHead(config.d_model, config.vocab_size, bias=False)
        # Not persistent: derived from the config, so checkpoints carry only real weights.
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.checkpoint_blocks = False  # training.activation_checkpointing

    def forward(self, input_ids, labels=None, *, reduction: str = "mean", kv_cache: KVCache | None = None):
        """Without labels: (logits [B, T, vocab], None). With labels: (None, loss), the cross-entropy
        against them (no shift here: labels[:, t] is the token to predict at position t; -100 is
        ignored): their mean, or with reduction="sum" their sum, or "none" each token's [B, T] (0
        where ignored). The loss is computed in chunks (OutputHead) and never forms the whole
        batch's logits, so it returns none; for logits, call without labels, or decode
        residual_stream's output a piece at a time."""
        return self.decode(self.residual_stream(input_ids, kv_cache=kv_cache), labels, reduction)

    def residual_stream(self, input_ids, *, kv_cache: KVCache | None = None, each=None):
        """The residual stream [B, T, d_model] after the last block: the tokens' embeddings, to which
        each block adds what its attention and its MLP compute. each(layer index, x), if given,
        receives each block's output as it is made (for a logit lens: decode(x, labels))."""
        start = 0 if kv_cache is None else kv_cache.seq_len
        T = input_ids.shape[1]
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len="
                             f"{self.config.max_seq_len}")
        # .float(): the tables stay float32 even if someone calls model.bfloat16()
        cos, sin = (table[start:start + T].float() for table in (self.rope_cos, self.rope_sin))
        x = self.embedding_proj(input_ids)
        for i, layer in enumerate(self.layers):
            if self.checkpoint_blocks and torch.is_grad_enabled():
                # Keep only the block's input, recompute the rest in the backward: same numbers
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, kv_cache, i)
            if each is not None:
                each(i, x)
        return x

    def decode(self, x, labels=None, reduction: str = "mean"):
        """The output head on a residual stream x [B, T, d_model] (the last block's, or any block's
        for a logit lens): output_norm, then the de-embedding. Returns forward's pair: (logits,
        None), or with labels (None, the loss), computed without the whole logits."""
        h = self.output_norm(x)
        if labels is None:
            return self.de_embedding_proj(h), None
        return None, self.de_embedding_proj(h, labels, reduction)

    def with_attention(self, input_ids, *, each):
        """residual_stream(input_ids), which also hands each layer's attention probabilities
        [B, heads, T, T] (Attention.probabilities) to each(layer index, probabilities) as that layer
        runs, so one layer's are held at a time. For analysis: training's forward takes SDPA's
        fused kernel alone and never forms them. decode() the result for logits or losses."""
        index = {block.attention: i for i, block in enumerate(self.layers)}

        def hook(attention, args, output):  # args: what the block passed, (x, cos, sin, ...)
            each(index[attention], attention.probabilities(*args[:3]))
        hooks = [block.attention.register_forward_hook(hook) for block in self.layers]
        try:
            return self.residual_stream(input_ids)
        finally:
            for handle in hooks:
                handle.remove()

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k=None):
        """Append max_new_tokens tokens to input_ids [B, T]: one prefill pass over the prompt,
        then one token per step against the KV-cache. temperature=0 is greedy."""
        if input_ids.shape[1] + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt of {input_ids.shape[1]} tokens + max_new_tokens="
                             f"{max_new_tokens} exceeds model.max_seq_len={self.config.max_seq_len}")
        cache = KVCache(self.config.n_layers)
        logits, _ = self.decode(self.residual_stream(input_ids, kv_cache=cache)[:, -1:])  # the last position's
        out = input_ids
        for i in range(max_new_tokens):
            next_logits = logits[:, -1, :].float()
            if temperature == 0:
                next_token = next_logits.argmax(-1, keepdim=True)
            else:
                next_logits = next_logits / temperature
                if top_k is not None:
                    kth = torch.topk(next_logits, min(top_k, next_logits.shape[-1])).values[:, -1:]
                    next_logits = next_logits.masked_fill(next_logits < kth, -math.inf)
                next_token = torch.multinomial(next_logits.softmax(-1), 1)
            out = torch.cat((out, next_token), dim=1)
            if i + 1 < max_new_tokens:
                logits, _ = self(next_token, kv_cache=cache)
        return out

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, revision: str | None = None) -> "PicoDecoder":
        """Load this trainer's export, pico-train's published format, or any transformers
        LlamaForCausalLM safetensors checkpoint the decoder can express: from a local directory,
        or from a Hub model repo ("namespace/name", optionally "@revision" or revision=...)."""
        import checkpoint  # checkpoint.py owns every on-disk format; it imports this module

        return checkpoint.load_pretrained(path_or_repo_id, revision=revision)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embedding_proj.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B:
        6 per weight that multiplies (the embedding lookup does not), plus attention scores."""
        c = self.config
        return 6 * self.num_params(exclude_embedding=True) + 12 * c.n_layers * c.d_model * seq_len
