"""transformers 5.x: ``attn_implementation="ringattn"``, RoPE fused into the kernel, packed batches.

    from ringattn.integrations import transformers as ra_hf
    ra_hf.register()                       # makes attn_implementation="ringattn" loadable
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="ringattn")
    ra_hf.apply(model)                     # fused RoPE (Llama, Mistral, Qwen2, Qwen3), optional ring group

Fused RoPE works per model, not by patching transformers: ``apply`` makes this model's rotary
embedding return the identity rotation (cos = 1, sin = 0, so the family's ``apply_rotary_pos_emb``
leaves q and k unchanged) and tells each attention layer to rotate inside the kernel from
``position_ids``. ``remove`` undoes both. All state lives on the model's own modules.
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass

import torch

from ..block import Span
from ..indexing import default_positions
from ..ops import attention
from ..rope import RoPEConfig

__all__ = [
    "register",
    "apply",
    "remove",
    "shard_batch",
    "count_predicted_tokens",
    "gather_sequence",
    "ringattn_attention",
    "ringattn_mask",
]

NAME = "ringattn"
FUSED_ROPE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_MIN_VERSION = (5, 0)


@dataclass(frozen=True)
class LayerState:
    """What ``apply`` attaches to each attention layer (as ``module.ringattn_state``)."""

    rope: RoPEConfig | None
    group: object | None
    layout: str


def _check_version():
    import transformers

    major_minor = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    if major_minor < _MIN_VERSION:
        raise RuntimeError(
            f"ringattn's transformers integration needs transformers >= 5.0, found {transformers.__version__}"
        )


def register() -> None:
    """Register "ringattn" as an attention and mask implementation (idempotent)."""
    _check_version()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, ringattn_attention)
    AttentionMaskInterface.register(NAME, ringattn_mask)


def ringattn_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """Like flash-attention's mask: None unless there is padding (which the attention then rejects)."""
    if attention_mask is not None:
        attention_mask = attention_mask[:, -kv_length:]
        if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
            return None
    return attention_mask


def _documents_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """cu_seqlens for packed positions (S,) that restart at 0 per document; None if no restart."""
    if position_ids.dim() != 1:
        return None  # several rows: each row is one sequence
    starts = torch.nonzero(position_ids == 0).flatten()
    if starts.numel() <= 1:
        return None
    end = torch.tensor([position_ids.shape[0]], device=starts.device)
    return torch.cat((starts, end)).to(torch.int32)


def ringattn_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: query (B, Hq, S, D), key/value (B, Hkv, S, D) -> (B, S, Hq, D)."""
    if attention_mask is not None:
        raise NotImplementedError(
            "attention_mask with padding: ringattn takes packed batches (DataCollatorWithFlattening) instead"
        )
    if dropout and module.training:
        raise NotImplementedError(f"dropout={dropout}: attention dropout is not supported")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(f"softcap={kwargs['softcap']} is not supported by ringattn")
    state = getattr(module, "ringattn_state", None) or LayerState(None, None, "zigzag")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    Sq, Sk = q.shape[1], k.shape[1]
    # A sliding window at least as long as the whole sequence never masks anything (Mistral's default).
    window = kwargs.get("sliding_window")
    seq_len = Sk * (1 if state.group is None else torch.distributed.get_world_size(state.group))
    if window is not None and window < seq_len:
        raise NotImplementedError(
            f"sliding_window={window} shorter than the sequence ({seq_len}) is not supported"
        )
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    position_ids = kwargs.get("position_ids")
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None and not torch.equal(cu_seqlens, kwargs.get("cu_seq_lens_k", cu_seqlens)):
        raise NotImplementedError("cu_seq_lens_k different from cu_seq_lens_q is not supported")
    if position_ids is not None and position_ids.shape[0] == 1:
        position_ids = position_ids[0]  # (1, S) is shared by every row of the batch
    if cu_seqlens is None and position_ids is not None:
        cu_seqlens = _documents_from_position_ids(position_ids)
    if state.rope is not None:
        if Sq != Sk:
            raise NotImplementedError(
                "fused RoPE with a KV cache: call ringattn's remove(model) before generate()"
            )
        if position_ids is None:
            raise ValueError("fused RoPE needs position_ids in the attention kwargs")
    if state.group is not None:
        from ..ring import ring_attn_func

        out = ring_attn_func(
            q,
            k,
            v,
            group=state.group,
            causal=causal,
            layout=state.layout,
            rope=state.rope,
            positions=position_ids if state.rope is not None else None,
            cu_seqlens=cu_seqlens,
            softmax_scale=scaling,
        )
        return out, None
    positions = position_ids if state.rope is not None else None
    # With a KV cache (Sq < Sk) the queries are the last Sq tokens: bottom-right causal alignment.
    out, _ = attention(
        q,
        k,
        v,
        causal=causal,
        softmax_scale=scaling,
        q_span=Span(Sk - Sq),
        cu_seqlens=cu_seqlens,
        rope=state.rope,
        q_positions=positions,
        k_positions=positions,
    )
    return out, None


def _identity_rotary_forward(self, x, position_ids, *args, **kwargs):
    shape = (*position_ids.shape, self.inv_freq.shape[0] * 2)
    ones = torch.ones(shape, dtype=x.dtype, device=x.device)
    return ones, torch.zeros_like(ones)


def _rotary_modules(model):
    return [
        m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "inv_freq")
    ]


def _attention_modules(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "is_causal")]


def apply(
    model, group=None, fuse_rope: bool = True, *, layout: str = "zigzag", rope_precision: str = "exact"
):
    """Switch ``model`` to ringattn attention; fuse RoPE into the kernel where the family allows.

    ``group``: a ProcessGroup to run ring attention over (inputs then are this rank's shards, see
    ``shard_batch``). ``rope_precision``: "exact" (default) or "hf" (transformers' fp32 angles,
    bit-for-bit parity with the unfused model). Returns the model.
    """
    register()
    family = model.config.model_type
    rope = None
    if fuse_rope and family in FUSED_ROPE_FAMILIES:
        rope = RoPEConfig.from_hf(model.config, precision=rope_precision)
        for rotary in _rotary_modules(model):
            rotary.forward = types.MethodType(_identity_rotary_forward, rotary)
    elif fuse_rope:
        warnings.warn(
            f"ringattn: model family {family!r} keeps its own RoPE (fused RoPE is implemented for "
            f"{', '.join(FUSED_ROPE_FAMILIES)}, whose rotary step is known to be a plain rotate-half)",
            stacklevel=2,
        )
    state = LayerState(rope, group, layout)
    for module in _attention_modules(model):
        module.ringattn_state = state
    model.ringattn_previous_attn = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    return model


def remove(model):
    """Undo ``apply``: the model's own RoPE and its previous attention implementation come back."""
    for rotary in _rotary_modules(model):
        rotary.__dict__.pop("forward", None)
    for module in _attention_modules(model):
        module.__dict__.pop("ringattn_state", None)
    previous = model.__dict__.pop("ringattn_previous_attn", None)
    if previous is not None:
        model.set_attn_implementation(previous)
    return model


def shard_batch(batch: dict, group=None, layout: str = "zigzag", ignore_index: int = -100) -> dict:
    """This rank's part of a causal-LM batch for ring training.

    ``batch`` holds ``input_ids`` (B, S) and optionally ``labels`` (default: the input ids),
    ``position_ids`` (default: the index within each document when ``cu_seq_lens_q`` is given, else
    0..S-1) and ``cu_seq_lens_q``/``cu_seq_lens_k`` (global; passed through unchanged). Labels are
    shifted on the full sequence *before* sharding, so a shard's last token still predicts its
    global successor; they come back as ``shift_labels`` (and as ``labels``, which the model needs
    to compute a loss at all). Pass ``num_items_in_batch`` = the global count of predicted tokens
    (``count_predicted_tokens``) so that per-rank losses sum to the full-sequence loss.
    """
    from ..ring import shard

    input_ids = batch["input_ids"]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, S), got shape {tuple(input_ids.shape)}")
    S = input_ids.shape[1]
    labels = batch.get("labels", input_ids)
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)
    cu = batch.get("cu_seq_lens_q")
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = default_positions(torch.arange(S, device=input_ids.device), cu).expand(input_ids.shape)
    local = {
        name: shard(t, 1, group, layout)
        for name, t in (
            ("input_ids", input_ids),
            ("shift_labels", shift_labels),
            ("position_ids", position_ids),
        )
    }
    local["labels"] = local["shift_labels"]
    for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        if name in batch:
            local[name] = batch[name]
    return local


def count_predicted_tokens(batch: dict, ignore_index: int = -100) -> torch.Tensor:
    """Number of tokens with a target in the full batch (the loss denominator every rank shares)."""
    labels = batch.get("labels", batch["input_ids"])
    return (labels[:, 1:] != ignore_index).sum()


def gather_sequence(x_local: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """Reassemble a full-sequence tensor (e.g. logits) from every rank's shard (a collective)."""
    from ..ring import unshard

    return unshard(x_local, dim, group, layout)
