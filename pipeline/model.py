"""The imitator: an Algorithm-Distillation transformer over a teacher's learning history.

A causal transformer (nanoGPT-style, pre-LayerNorm, rotary positions) reads a flat stream with
one token per env step, running across episode boundaries, and predicts the teacher's action at
every step. Trained by next-action prediction on the teacher's histories, then frozen and rolled
out: whatever improvement it shows in a rollout can only come from its context.

Its attention is sliding-window (as Mistral's, or Longformer's local attention): every token
attends to itself and the context_steps - 1 tokens before it, over a stream of any length. So a
rollout keeps a key/value cache of the last context_steps tokens per layer and pays one token of
compute per layer per env step, and the cache gives exactly what forward() gives on the whole
stream so far (see the notes below the imports).

    args = ModelArgs(obs_kind="discrete", obs_shape=(), obs_n=81, n_actions=5)
    model = Imitator(args)
    logits, loss = model(obs, prev_action, prev_reward, first, targets=actions)  # training, (B, T, ...)

    cache = model.init_cache(batch_size=n_envs)           # rollout, n_envs stepping in lockstep
    logits = model.step(cache, obs, prev_action, prev_reward, first)   # (n_envs, n_actions)
    actions = sample_actions(logits, temperature=1.0)

Checkpoints store `dataclasses.asdict(args)`; `Imitator(ModelArgs.from_dict(d))` rebuilds the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.teachers.rllib_config import NATURE_CNN

OBS_KINDS = ("discrete", "vector", "image")  # the names of pipeline.schema.ObsEncoding.kind
ROPE_BASE = 10000.0

# ---------------------------------------------------------------------------------------------
# Token layout: ONE token per env step t of a flat stream that runs across episode boundaries.
#
#   token_t = obs_encoder(obs_t)                     what the agent sees at step t
#           + action_embedding(prev_action_t)        action taken at step t-1 of the stream
#           + reward_proj(prev_reward_t)             reward received at step t-1 of the stream
#           + first_embedding(first_t)               1 if step t starts an episode
#
# prev_action_t / prev_reward_t come from the previous step of the *stream*, also across an
# episode boundary (at an episode's first step they are the previous episode's last action and
# reward). prev_action_t == n_actions means "no previous step" (the start of a stream; its
# prev_reward is ignored by convention and should be 0). The output at position t is the
# distribution of action_t, the teacher's action at step t, computed from tokens <= t.
#
# Positions are rotary (RoPE), absolute 0, 1, 2, ... from the first token of the stream the model
# sees; rotated query-key scores depend on the relative position i - j only.
#
# Attention is a causal band of width context_steps (sliding-window attention, SWA): in every
# layer, query i attends to key j iff 0 <= i - j < context_steps. forward() takes streams of any
# length T; for T <= context_steps the band is the plain causal mask (the is_causal fast path),
# and training, on windows of exactly context_steps steps, only ever sees that plain causal mask.
#
# Why this makes a key/value cache exact: the layer-l key and value of token j depend only on
# the band below j in layer l-1, never on the query that reads them, so the cache's layer-l key
# of a token is the very key forward() computes for it, and a new token that attends to the
# last context_steps cached keys of each layer does exactly what the band does. The receptive
# field grows with depth, identically in both paths: the output at step t depends on steps
# t - n_layer * (context_steps - 1) .. t, not on the last context_steps steps alone. That is
# also why "recomputing the context" (the reference the KV-cache benchmark compares against,
# forward() over the last context_steps steps, rerun at every env step) is NOT the same
# function once a stream is longer than context_steps and n_layer >= 2: it cuts the receptive
# field to one window. Both agree while t < context_steps. It is a cost reference only.
#
# A caveat for research use: training on windows of context_steps steps never exercises that
# deeper receptive field (there every window starts the stream afresh, and the band is the
# causal mask), while a rollout past context_steps steps does. forward() accepts windows longer
# than context_steps, so training on them is the way to match the two, should that matter.
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelArgs:
    obs_kind: str  # "discrete" | "vector" | "image"  (as pipeline.schema.ObsEncoding.kind)
    obs_shape: tuple[int, ...]  # () for discrete, (d,) for vector, (H, W) for image frames
    obs_n: int  # number of discrete observation values (discrete only, else 0)
    n_actions: int
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    context_steps: int = 64  # steps the model attends to (one token per env step)
    frame_stack: int = 4  # image only: frames per observation the conv stack sees
    dropout: float = 0.0

    def __post_init__(self):
        self.obs_shape = tuple(int(n) for n in self.obs_shape)
        for name in ("n_actions", "n_layer", "n_head", "n_embd", "context_steps", "frame_stack"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelArgs.{name} must be >= 1, got {getattr(self, name)}")
        if self.obs_kind not in OBS_KINDS:
            raise ValueError(f"ModelArgs.obs_kind must be one of {OBS_KINDS}, got {self.obs_kind!r}")
        self._check_obs_shape()
        if self.obs_kind == "discrete" and self.obs_n < 1:
            raise ValueError(f"ModelArgs.obs_n must be >= 1 for discrete observations, got {self.obs_n}")
        if self.n_embd % self.n_head:
            raise ValueError(f"ModelArgs.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"ModelArgs.n_embd / n_head (head size {self.n_embd // self.n_head}) must be even for rotary embeddings"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelArgs.dropout must be in [0, 1), got {self.dropout}")

    def _check_obs_shape(self):
        expected_rank = {"discrete": 0, "vector": 1, "image": 2}[self.obs_kind]
        if len(self.obs_shape) != expected_rank or any(n < 1 for n in self.obs_shape):
            raise ValueError(
                f"ModelArgs.obs_shape {self.obs_shape} does not fit obs_kind {self.obs_kind!r}: "
                "expected () for discrete, (d,) for vector, (H, W) for image"
            )
        min_side = conv_min_side()
        if self.obs_kind == "image" and min(self.obs_shape) < min_side:
            raise ValueError(f"ModelArgs.obs_shape {self.obs_shape}: image frames must be at least {min_side}x{min_side}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        """Inverse of dataclasses.asdict, also after a JSON round trip (lists back to tuples)."""
        return cls(**{**d, "obs_shape": tuple(d["obs_shape"])})


def conv_min_side() -> int:
    """Smallest frame side the Nature conv stack accepts (36)."""
    side = 1
    for _, kernel, stride in reversed(NATURE_CNN):
        side = (side - 1) * stride + kernel
    return side


# ----------------------------------------------------------------------------- rotary positions


def rotary_inv_freq(head_size: int, device=None) -> torch.Tensor:
    """The rotation frequencies (head_size/2,), float64 (on the CPU where the device has no float64)."""
    device = _float64_device(device)
    return ROPE_BASE ** (-torch.arange(0, head_size, 2, dtype=torch.float64, device=device) / head_size)


def rotary_cos_sin(length: int, head_size: int, start: int = 0, device=None,
                   inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the rotation angles at positions start..start+length-1, each (length, head_size/2),
    float32 on `device`. Angles are computed in float64, so that positions far into a long rollout
    keep their precision; forward() and step() compute the same position the same way."""
    if inv_freq is None:
        inv_freq = rotary_inv_freq(head_size, device)
    positions = torch.arange(start, start + length, dtype=torch.float64, device=inv_freq.device)
    angles = torch.outer(positions, inv_freq)  # (T, hs/2)
    device = inv_freq.device if device is None else device
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _float64_device(device) -> torch.device:
    device = torch.device("cpu") if device is None else torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device  # MPS has no float64


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + hs/2]) of x (B, nh, T, hs) by the angles of cos/sin (T, hs/2)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# ----------------------------------------------------------------------------- transformer


class CausalSelfAttention(nn.Module):
    """Sliding-window causal self-attention: query i attends to key j iff 0 <= i - j < context_steps."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.head_size, self.dropout = args.n_head, args.head_size, args.dropout
        self.qkv = nn.Linear(args.n_embd, 3 * args.n_embd)
        self.proj = nn.Linear(args.n_embd, args.n_embd)
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, band=None, kv=None):
        """x (B, T, C); cos/sin (T, hs/2) at the tokens' absolute positions. Without `kv`: band is
        None (plain causal, T <= context_steps) or a (T, T) bool mask, True = attend. With `kv`
        (one new token, T = 1): (keys, values, slot, filled, mask), the layer's cache buffers
        (B, nh, context_steps, hs); this token's key/value are written at `slot` and the query
        attends to the first `filled` slots, which then hold exactly the last <= context_steps
        tokens including this one (their order does not matter: each key carries its own rotation),
        except where `mask` (B, 1, 1, filled), if not None, is False (padding tokens)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_size).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) each
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is None:
            dropout_p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=dropout_p, is_causal=band is None)
        else:
            keys, values, slot, filled, mask = kv
            keys[:, :, slot] = k[:, :, 0]
            values[:, :, slot] = v[:, :, 0]
            y = F.scaled_dot_product_attention(q, keys[:, :, :filled], values[:, :, :filled], attn_mask=mask)  # (B, nh, 1, hs)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.n_embd)
        self.attn = CausalSelfAttention(args)
        self.ln_2 = nn.LayerNorm(args.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(args.n_embd, 4 * args.n_embd),
            nn.GELU(),
            nn.Linear(4 * args.n_embd, args.n_embd),
            nn.Dropout(args.dropout),
        )

    def forward(self, x, cos, sin, band=None, kv=None):
        x = x + self.attn(self.ln_1(x), cos, sin, band, kv)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------- observation encoders


class FrameStackEncoder(nn.Module):
    """Nature-DQN conv stack over (B, T, frame_stack, H, W) uint8 frames -> (B, T, C)."""

    def __init__(self, frame_stack: int, frame_shape: tuple[int, int], n_embd: int):
        super().__init__()
        layers, channels, (h, w) = [], frame_stack, frame_shape
        self.conv_macs = 0  # multiply-accumulates per observation, for flops_per_step
        for out_channels, kernel, stride in NATURE_CNN:
            layers += [nn.Conv2d(channels, out_channels, kernel, stride), nn.ReLU()]
            h, w = (h - kernel) // stride + 1, (w - kernel) // stride + 1
            self.conv_macs += h * w * out_channels * channels * kernel * kernel
            channels = out_channels
        self.convs = nn.Sequential(*layers, nn.Flatten())
        self.out = nn.Linear(channels * h * w, n_embd)

    def forward(self, frames):
        B, T = frames.shape[:2]
        x = frames.reshape(B * T, *frames.shape[2:]).to(self.out.weight.dtype) / 255.0  # (B*T, F, H, W)
        return self.out(self.convs(x)).view(B, T, -1)  # (B, T, C)


class VectorEncoder(nn.Linear):
    def forward(self, obs):
        return super().forward(obs.to(self.weight.dtype))  # (B, T, d) -> (B, T, C)


def make_obs_encoder(args: ModelArgs) -> nn.Module:
    if args.obs_kind == "discrete":
        return nn.Embedding(args.obs_n, args.n_embd)  # (B, T) int64 -> (B, T, C)
    if args.obs_kind == "vector":
        return VectorEncoder(args.obs_shape[0], args.n_embd)
    return FrameStackEncoder(args.frame_stack, args.obs_shape, args.n_embd)


# ----------------------------------------------------------------------------- the imitator


@dataclass
class KVCache:
    """Per layer, the rotated keys and the values of the last context_steps tokens of a batch of
    envs stepping in lockstep, in ring buffers: the token at stream position p sits in slot
    p % context_steps."""

    keys: torch.Tensor  # (n_layer, B, n_head, context_steps, head_size), keys rotated at their positions
    values: torch.Tensor  # (n_layer, B, n_head, context_steps, head_size)
    inv_freq: torch.Tensor  # (head_size/2,) float64, the rotary frequencies
    position: int = 0  # stream position of the next token = steps taken so far
    # (B, context_steps) bool, False where a slot holds a padding token (Imitator.step's `real`);
    # None while no slot does
    real: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]


class Imitator(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        C = args.n_embd
        self.obs_encoder = make_obs_encoder(args)
        self.action_embedding = nn.Embedding(args.n_actions + 1, C)  # index n_actions: no previous step
        self.reward_proj = nn.Linear(1, C)
        self.first_embedding = nn.Embedding(2, C)
        self.drop = nn.Dropout(args.dropout)
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, args.n_actions, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _tokens(self, obs, prev_action, prev_reward, first):
        """Inputs with shape (B, T, ...) -> tokens (B, T, C); see the token layout above."""
        reward = prev_reward.to(self.reward_proj.weight.dtype).unsqueeze(-1)  # (B, T, 1)
        tokens = (
            self.obs_encoder(obs)
            + self.action_embedding(prev_action)
            + self.reward_proj(reward)
            + self.first_embedding(first.long())
        )
        return self.drop(tokens)  # (B, T, C)

    def _transform(self, tokens):
        """tokens (B, T, C) of a stream from its first step -> final hidden states (B, T, C),
        sliding-window causal attention at positions 0..T-1."""
        T, W, device = tokens.shape[1], self.args.context_steps, tokens.device
        cos, sin = rotary_cos_sin(T, self.args.head_size, device=device)  # (T, hs/2)
        cos, sin = cos.to(tokens.dtype), sin.to(tokens.dtype)
        band = None  # T <= W: the band is the plain causal mask
        if T > W:
            offset = torch.arange(T, device=device)
            offset = offset[:, None] - offset[None, :]  # (T, T): i - j
            band = (offset >= 0) & (offset < W)
        x = tokens
        for block in self.blocks:
            x = block(x, cos, sin, band)
        return self.ln_f(x)  # (B, T, C)

    def forward(self, obs, prev_action, prev_reward, first, targets=None):
        """obs (B, T) int64 | (B, T, d) float | (B, T, frame_stack, H, W) uint8; prev_action (B, T)
        int64; prev_reward (B, T) float; first (B, T) bool; targets (B, T) int64, -1 = ignore.
        Returns logits (B, T, n_actions) and the mean cross entropy (None without targets).

        Any T: the inputs are a stream from its first step (position 0), and every layer attends
        within a sliding window of context_steps tokens. For T <= context_steps (training
        windows) that is plain causal attention; longer T costs O(T^2) here (a reference for the
        cache, which gives the same logits at O(context_steps) per step). "Recomputing the
        context" at rollout time, the baseline the cache is benchmarked against, means calling
        this on the last context_steps steps at every env step."""
        logits = self.head(self._transform(self._tokens(obs, prev_action, prev_reward, first)))  # (B, T, n_actions)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    # ------------------------------------------------------------------------- rollouts

    def init_cache(self, batch_size: int, device=None) -> KVCache:
        """An empty key/value cache for `batch_size` envs stepping in lockstep (device: the
        parameters' by default), preallocated for context_steps tokens per layer."""
        a, weight = self.args, self.head.weight
        device = weight.device if device is None else torch.device(device)
        shape = (a.n_layer, batch_size, a.n_head, a.context_steps, a.head_size)
        return KVCache(
            keys=torch.zeros(shape, dtype=weight.dtype, device=device),
            values=torch.zeros(shape, dtype=weight.dtype, device=device),
            inv_freq=rotary_inv_freq(a.head_size, device),
        )

    @torch.no_grad()
    def step(self, cache: KVCache, obs, prev_action, prev_reward, first, real=None) -> torch.Tensor:
        """One env step for every env: inputs as in forward without the T dimension. Computes
        this step's token and, per layer, its query, key and value only; the token attends to
        the cached keys of the last context_steps - 1 steps plus its own, and its key/value
        replace the oldest. Returns the logits (B, n_actions) of action_t, exactly those of
        forward() over the whole stream so far, last position. Costs one token of compute per
        layer plus O(context_steps * n_embd) for attention. Call model.eval() first unless
        dropout is 0.

        `real` (B,) bool, False for envs whose token is padding: it enters the cache, but no
        later token attends to it, so envs whose streams start at different steps share one
        cache (ImitatorPolicy.prime). An env's stream then starts at a later position, which
        changes nothing but rounding: rotated scores depend on relative positions only."""
        if prev_action.shape[0] != cache.batch_size:
            raise ValueError(f"batch of {prev_action.shape[0]} envs, cache was built for {cache.batch_size}")
        W, position = self.args.context_steps, cache.position
        x = self._tokens(obs.unsqueeze(1), prev_action.unsqueeze(1), prev_reward.unsqueeze(1), first.unsqueeze(1))
        cos, sin = rotary_cos_sin(1, self.args.head_size, start=position, device=x.device, inv_freq=cache.inv_freq)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (1, hs/2)
        slot, filled = position % W, min(position + 1, W)
        mask = self._padding_mask(cache, slot, filled, real)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, kv=(cache.keys[layer], cache.values[layer], slot, filled, mask))
        cache.position = position + 1
        return self.head(self.ln_f(x[:, 0]))  # (B, n_actions)

    @staticmethod
    def _padding_mask(cache: KVCache, slot: int, filled: int, real) -> torch.Tensor | None:
        """(B, 1, 1, filled) bool attention mask hiding the cache's padding tokens, None when it holds
        none. Every token attends to itself, so a padding token's own output stays finite."""
        if real is None and cache.real is None:
            return None
        if cache.real is None:
            cache.real = torch.ones(cache.batch_size, cache.keys.shape[3], dtype=torch.bool, device=cache.keys.device)
        cache.real[:, slot] = True if real is None else real
        mask = cache.real[:, :filled].clone()
        mask[:, slot] = True
        if real is None and bool(cache.real.all()):
            cache.real = None  # the last padding token has left the window
        return mask[:, None, None, :]

    # ------------------------------------------------------------------------- bookkeeping

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_step(self) -> int:
        """Training FLOPs (forward + backward) per token at full context, nanoGPT's estimate
        (PaLM appendix B): 6 per matmul weight (2 forward, 4 backward), i.e. every parameter
        except the embedding tables (lookups) and the conv kernels; plus 12 * L * C * T for the
        attention scores and weighted values over T = context_steps; plus, for images, 6 per
        multiply-accumulate of the conv stack (its kernels are reused at every output pixel)."""
        lookups = [m for m in self.modules() if isinstance(m, (nn.Embedding, nn.Conv2d))]
        lookup_params = sum(p.numel() for m in lookups for p in m.parameters())
        a = self.args
        flops = 6 * (self.num_params() - lookup_params) + 12 * a.n_layer * a.n_embd * a.context_steps
        return flops + 6 * getattr(self.obs_encoder, "conv_macs", 0)

    def configure_optimizer(self, weight_decay: float, lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
        """AdamW with weight decay on weights of 2 or more dimensions (matmuls, embeddings,
        convs) and none on biases and LayerNorm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = self.head.weight.is_cuda
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def sample_actions(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (..., n_actions) -> actions (...) int64: argmax if temperature == 0, else a draw
    from softmax(logits / temperature)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(logits.float() / temperature, dim=-1).reshape(-1, logits.shape[-1])  # (N, n_actions)
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])
