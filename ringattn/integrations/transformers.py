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
    "RingAttentionMixin",
    "RingAttentionTrainer",  # noqa: F822 (built on first use, see __getattr__)
    "context_parallel_groups",
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
    """Like flash-attention's mask: None unless there is padding, else the (B, kv_length) key padding
    mask (1 = a real token), which the attention unpads."""
    if attention_mask is not None:
        attention_mask = attention_mask[:, -kv_length:]
        if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
            return None
    return attention_mask


def _documents_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """cu_seqlens for packed positions (S,): a document starts at index 0 and wherever the position
    restarts at 0; None when there is no restart (the row is one sequence).

    The row's first run is a document even when it does not start at 0 (``[5, 6, 7, 0, 1, ...]``: a
    document continued from the previous batch keeps its positions 5, 6, 7 for RoPE)."""
    if position_ids.dim() != 1:
        return None  # several rows: each row is one sequence
    restarts = torch.nonzero(position_ids[1:] == 0).flatten() + 1
    if restarts.numel() == 0:
        return None
    first = restarts.new_zeros(1)
    end = restarts.new_full((1,), position_ids.shape[0])
    return torch.cat((first, restarts, end)).to(torch.int32)


def _check_cu_seqlens(name: str, cu: object, total: int | None) -> None:
    """``cu_seq_lens_q``/``cu_seq_lens_k`` as passed to the model: int boundaries 0 = c0 <= c1 <= ...
    ending at ``total`` tokens (None: the global length, which the ring checks itself)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of int32/int64 document boundaries, got {type(cu).__name__}"
        )
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64 document boundaries, got dtype {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries, got shape {tuple(cu.shape)}")
    values = cu.tolist()
    if values[0] != 0 or any(b < a for a, b in zip(values[:-1], values[1:], strict=True)):
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {values}")
    if total is not None and values[-1] != total:
        raise ValueError(
            f"{name} must end at the number of tokens in a row ({total}), got {values[-1]} "
            "(packed batches are one row: input_ids of shape (1, total))"
        )


def _ring(state: LayerState):
    """The communicator of a layer's ring group (None without one)."""
    if state.group is None:
        return None
    from ..ring import ring_comm

    return ring_comm(state.group)


def _documents(position_ids: torch.Tensor, comm, layout: str) -> torch.Tensor | None:
    """Documents implied by packed positions. In a ring each rank holds a shard, so the positions of the
    full sequence are gathered first (a collective every rank runs): every rank derives the same."""
    if comm is not None and position_ids.dim() == 1:
        from ..ring import unshard

        if layout == "doc_zigzag":  # its shards depend on the documents: they cannot be derived here
            raise ValueError(
                "layout='doc_zigzag' in a ring needs cu_seq_lens_q/cu_seq_lens_k in the model's inputs "
                "(ringattn.integrations.transformers.shard_batch passes them)"
            )
        position_ids = unshard(position_ids, 0, comm, layout)
    return _documents_from_position_ids(position_ids)


def _key_positions(key_valid: torch.Tensor | None, Sk: int, device) -> torch.Tensor:
    """Key positions with a KV cache: 0, 1, ... counted over real tokens (left padding skipped), as
    transformers derives position_ids from the attention mask."""
    if key_valid is None:
        return torch.arange(Sk, device=device)
    return (key_valid.long().cumsum(-1) - 1).clamp(min=0)


def ringattn_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D) -> (B, Sq, Hq, D).

    Padding (``attention_mask`` (B, Sk) from ``ringattn_mask``) is unpadded into a varlen call;
    ``sliding_window`` and ``softcap`` run in the kernel. With a KV cache (Sq < Sk) the queries are the
    last Sq tokens; fused RoPE then rotates the cached keys in the kernel at their positions. Under
    ``torch.compile`` nothing here reads tensor data: packed documents must come as ``cu_seq_lens_q``/
    ``_k`` (``shard_batch`` passes them), since restarts in ``position_ids`` are not looked for.
    """
    if dropout and module.training:
        raise NotImplementedError(f"dropout={dropout}: attention dropout is not supported")
    state = getattr(module, "ringattn_state", None) or LayerState(None, None, "zigzag")
    comm = _ring(state)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    Sq, Sk = q.shape[1], k.shape[1]
    key_valid = None if attention_mask is None else attention_mask.bool()
    if key_valid is not None and (key_valid.dim() != 2 or key_valid.shape != (q.shape[0], Sk)):
        raise NotImplementedError(
            f"attention_mask of shape {tuple(attention_mask.shape)}: ringattn takes a (batch, {Sk}) padding mask"
        )
    if key_valid is not None and comm is not None:
        raise NotImplementedError(
            "attention_mask with padding in a ring: ringattn takes packed batches (DataCollatorWithFlattening)"
        )
    softcap = kwargs.get("softcap") or 0.0
    window = kwargs.get("sliding_window")
    seq_len = Sk * (1 if comm is None else comm.world_size)
    window_size = (-1, -1)
    if window is not None and window < seq_len:  # transformers: keys in (q - window, q]
        window_size = (window - 1, window - 1)
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    position_ids = kwargs.get("position_ids")
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    cu_k = kwargs.get("cu_seq_lens_k")
    # Without a ring a row holds every token; in a ring the global length is checked by ring_attn_func.
    total = Sk if comm is None else None
    eager = not torch.compiler.is_compiling()  # the checks below read tensor data
    for name, cu in (("cu_seq_lens_q", cu_seqlens), ("cu_seq_lens_k", cu_k)):
        if cu is not None and eager:
            _check_cu_seqlens(name, cu, total)
    if (cu_k is not None and cu_seqlens is None) or (
        cu_k is not None and eager and not torch.equal(cu_seqlens.long(), cu_k.to(cu_seqlens.device).long())
    ):
        raise NotImplementedError(
            "cu_seq_lens_k different from cu_seq_lens_q (or without it) is not supported"
        )
    if position_ids is not None and position_ids.shape[0] == 1:
        position_ids = position_ids[0]  # (1, S) is shared by every row of the batch
    if cu_seqlens is None and position_ids is not None and key_valid is None and Sq == Sk and eager:
        cu_seqlens = _documents(position_ids, comm, state.layout)
    q_positions = k_positions = None
    if state.rope is not None:
        if position_ids is None:
            raise ValueError("fused RoPE needs position_ids in the attention kwargs")
        q_positions = position_ids
        k_positions = position_ids if Sq == Sk else _key_positions(key_valid, Sk, q.device)
    if comm is not None:
        from ..ring import ring_attn_func

        out = ring_attn_func(
            q, k, v, group=comm, causal=causal, layout=state.layout, rope=state.rope,
            positions=q_positions, cu_seqlens=cu_seqlens, softmax_scale=scaling,
            window_size=window_size, softcap=softcap,
        )  # fmt: skip
        return out, None
    if key_valid is not None:
        from ..api import key_padding_attention

        if cu_seqlens is not None:
            raise NotImplementedError("attention_mask with padding and packed documents together")
        out = key_padding_attention(
            q, k, v, key_valid, causal=causal, softmax_scale=scaling, rope=state.rope,
            q_positions=q_positions, k_positions=k_positions, window_size=window_size, softcap=softcap,
        )  # fmt: skip
        return out, None
    # With a KV cache (Sq < Sk) the queries are the last Sq tokens: bottom-right causal alignment.
    out, _ = attention(
        q, k, v, causal=causal, softmax_scale=scaling, q_span=Span(Sk - Sq), cu_seqlens=cu_seqlens,
        rope=state.rope, q_positions=q_positions, k_positions=k_positions, window_size=window_size,
        softcap=softcap,
    )  # fmt: skip
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


def _check_group(group) -> None:
    """``apply``'s ``group``, checked now rather than at the first forward."""
    if group is None:
        return
    import torch.distributed as dist

    from ..ring import RingComm, TwoLevelComm, ring_comm

    mesh = getattr(getattr(dist, "device_mesh", None), "DeviceMesh", None)
    kinds = (RingComm, TwoLevelComm, tuple, list)
    kinds += (dist.ProcessGroup,) if dist.is_available() else ()
    kinds += (mesh,) if mesh is not None else ()
    if not isinstance(group, kinds):
        raise TypeError(
            "apply(group=...) must be None, a ProcessGroup, a DeviceMesh, an (inner, outer) pair, a RingComm "
            f"or a TwoLevelComm, got {type(group).__name__}"
        )
    ring_comm(group)  # the rest of the checks (a pair's members, an initialised process group)


def apply(
    model, group=None, fuse_rope: bool = True, *, layout: str = "zigzag", rope_precision: str = "exact"
):
    """Switch ``model`` to ringattn attention; fuse RoPE into the kernel where the family allows.

    ``group``: the ring to run ring attention over (inputs then are this rank's shards, see
    ``shard_batch``): a ProcessGroup, a DeviceMesh, an (inner, outer) pair, or a communicator
    (``ringattn.ring.ring_comm``, a ``RingComm`` or ``TwoLevelComm``). ``rope_precision``: "exact"
    (default) or "hf" (transformers' fp32 angles, bit-for-bit parity with the unfused model).
    Applying again replaces the earlier settings (as if ``remove`` ran first); ``remove`` then
    restores the model as it was before the first ``apply``. Returns the model.
    """
    from ..layouts import LAYOUTS

    register()
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _check_group(group)
    family = model.config.model_type
    rope = None
    if fuse_rope and family in FUSED_ROPE_FAMILIES:
        rope = RoPEConfig.from_hf(model.config, precision=rope_precision)
    elif fuse_rope:
        warnings.warn(
            f"ringattn: model family {family!r} keeps its own RoPE (fused RoPE is implemented for "
            f"{', '.join(FUSED_ROPE_FAMILIES)}, whose rotary step is known to be a plain rotate-half)",
            stacklevel=2,
        )
    remove(model)  # a second apply starts from the original model, not from the first apply's state
    if rope is not None:
        for rotary in _rotary_modules(model):
            # Keep an instance-level forward someone else installed (e.g. an accelerate hook).
            rotary.ringattn_saved_forward = rotary.__dict__.get("forward")
            rotary.forward = types.MethodType(_identity_rotary_forward, rotary)
    state = LayerState(rope, group, layout)
    for module in _attention_modules(model):
        module.ringattn_state = state
    model.ringattn_previous_attn = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    return model


def remove(model):
    """Undo ``apply`` (any number of them): the model's own RoPE and the attention implementation it
    had before the first ``apply`` come back. A model ``apply`` never touched is returned unchanged."""
    for rotary in _rotary_modules(model):
        if "ringattn_saved_forward" in rotary.__dict__:
            saved = rotary.__dict__.pop("ringattn_saved_forward")
            rotary.__dict__.pop("forward", None)
            if saved is not None:
                rotary.forward = saved
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
    0..S-1) and ``cu_seq_lens_q``/``cu_seq_lens_k`` (global; passed through unchanged; when absent,
    the documents of a single row's ``position_ids`` are derived here, from the full sequence, and
    passed as ``cu_seq_lens_q``/``cu_seq_lens_k`` so the ranks need not gather positions). Labels are
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
    derived = None
    if cu is None and "position_ids" in batch and position_ids.shape[0] == 1:
        derived = _documents_from_position_ids(position_ids.reshape(-1))
    documents = _layout_documents(layout, cu if cu is not None else derived)
    local = {
        name: shard(t, 1, group, layout, **documents)
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
    if derived is not None:
        local["cu_seq_lens_q"] = local["cu_seq_lens_k"] = derived
    return local


def _layout_documents(layout: str, cu_seqlens) -> dict:
    """``shard``/``unshard``'s documents argument: only the "doc_zigzag" layout cuts by document."""
    if layout != "doc_zigzag":
        return {}
    if cu_seqlens is None:
        raise ValueError(
            "layout='doc_zigzag' cuts every document: the batch needs cu_seq_lens_q or packed position_ids"
        )
    return {"cu_seqlens": cu_seqlens}


def count_predicted_tokens(batch: dict, ignore_index: int = -100) -> torch.Tensor:
    """Number of tokens with a target in the full batch (the loss denominator every rank shares)."""
    labels = batch.get("labels", batch["input_ids"])
    return (labels[:, 1:] != ignore_index).sum()


def gather_sequence(
    x_local: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 1, cu_seqlens=None
) -> torch.Tensor:
    """Reassemble a full-sequence tensor (e.g. logits) from every rank's shard (a collective).
    ``cu_seqlens``: the batch's documents, needed (only) by the "doc_zigzag" layout."""
    from ..ring import unshard

    return unshard(x_local, dim, group, layout, **_layout_documents(layout, cu_seqlens))


# ------------------------------------------------------------------------------------------------
# transformers.Trainer with context parallelism over ring attention (data parallel x context parallel)


def context_parallel_groups(cp_size: int):
    """This process's context-parallel group on a 2-D mesh DP x CP of the default group's ranks:
    CP groups are runs of ``cp_size`` consecutive ranks (inside a node when ranks fill nodes in order),
    DP replicas the ``world // cp_size`` runs. Creating groups is collective: every rank calls this
    with the same ``cp_size``. Returns ``(cp_group, dp_rank, dp_size)``."""
    import torch.distributed as dist

    if not isinstance(cp_size, int) or isinstance(cp_size, bool) or cp_size < 1:
        raise ValueError(f"cp_size must be a positive int, got {cp_size!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "context parallelism needs torch.distributed initialised: launch with torchrun "
            f"(cp_size={cp_size})"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % cp_size:
        raise ValueError(f"cp_size={cp_size} must divide the world size {world}")
    mine = None
    for start in range(0, world, cp_size):  # the same new_group calls in the same order on every rank
        group = dist.new_group(list(range(start, start + cp_size)))
        if start <= rank < start + cp_size:
            mine = group
    return mine, rank // cp_size, world // cp_size


class RingAttentionMixin:
    """Context parallelism for a ``transformers.Trainer`` (or any subclass of it, e.g. TRL's): mix it in
    first, ``class MyTrainer(RingAttentionMixin, SFTTrainer)``, or use ``RingAttentionTrainer``.

    ``cp_size`` consecutive ranks (launched with torchrun) form one ring and share one sequence; the
    world is a 2-D mesh of ``world // cp_size`` data-parallel replicas x ``cp_size`` context-parallel
    ranks. The mixin applies ringattn to the model (``apply(model, group=cp_group, layout=...)``),
    makes the ranks of a ring read the same batches (the data loaders are sharded over the
    data-parallel replicas only), gives each rank its shard of every batch (``shard_batch``: labels
    shifted before sharding) and reports ``get_cp_size() == cp_size`` to the Trainer, whose loss
    normalisation then counts every target once: each rank's loss is its shard's sum over the global
    number of targets, scaled like the Trainer's own data-parallel losses, so DDP's average over all
    ranks is exactly the data-parallel gradient, with gradient accumulation too. Batches must hold
    unpadded rows (equal lengths, or packed rows from ``DataCollatorWithFlattening``).
    """

    def __init__(
        self, *args, cp_size: int = 1, layout: str = "zigzag", rope_precision: str = "exact", **kwargs
    ):
        super().__init__(*args, **kwargs)
        if self.args.label_smoothing_factor:
            raise NotImplementedError("label smoothing with context parallelism is not supported")
        if self.compute_loss_func is not None:
            raise NotImplementedError("compute_loss_func with context parallelism is not supported")
        if not self.model_accepts_loss_kwargs:
            raise NotImplementedError(
                f"{type(self.model).__name__}.forward takes no loss kwargs: the shards' losses need "
                "num_items_in_batch to add up"
            )
        self.cp_size, self.cp_layout = cp_size, layout
        self.cp_group, self.dp_rank, self.dp_size = None, self.args.process_index, self.args.world_size
        if cp_size > 1:
            self.cp_group, self.dp_rank, self.dp_size = context_parallel_groups(cp_size)
        apply(self.model, group=self.cp_group, layout=layout, rope_precision=rope_precision)

    def get_cp_size(self) -> int:
        return self.cp_size

    def _data_parallel_loader(self, loader):
        """Shard ``loader`` over the data-parallel replicas only: the ranks of a ring read the same
        batches (as transformers itself does for its rank-aware samplers)."""
        if self.cp_size == 1:
            return loader
        from accelerate.data_loader import BatchSamplerShard, IterableDatasetShard

        sampler = getattr(loader, "batch_sampler", None)
        dataset = getattr(loader, "dataset", None)
        if isinstance(sampler, BatchSamplerShard):
            sampler.num_processes, sampler.process_index = self.dp_size, self.dp_rank
        elif isinstance(dataset, IterableDatasetShard):
            dataset.num_processes, dataset.process_index = self.dp_size, self.dp_rank
        else:
            raise NotImplementedError(
                f"context parallelism cannot make the ranks of a ring read the same batches from "
                f"{type(loader).__name__} (dispatch_batches=True?): use a map-style dataset or "
                "accelerator_config={'dispatch_batches': False}"
            )
        return loader

    def get_train_dataloader(self):
        return self._data_parallel_loader(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset=None):
        return self._data_parallel_loader(super().get_eval_dataloader(eval_dataset))

    def get_test_dataloader(self, test_dataset):
        return self._data_parallel_loader(super().get_test_dataloader(test_dataset))

    def _shard_inputs(self, inputs: dict) -> dict:
        mask = inputs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise NotImplementedError(
                "padded batches with context parallelism: pack them (DataCollatorWithFlattening) "
                "or use rows of equal length"
            )
        if self.cp_group is None:
            return {k: v for k, v in inputs.items() if k != "attention_mask"}
        local = shard_batch(inputs, group=self.cp_group, layout=self.cp_layout)
        rest = ("input_ids", "labels", "shift_labels", "position_ids", "attention_mask")
        local.update({k: v for k, v in inputs.items() if k not in local and k not in rest})
        return local

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(
            model,
            self._shard_inputs(inputs),
            return_outputs=return_outputs,
            num_items_in_batch=num_items_in_batch,
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if logits is not None and self.cp_group is not None:  # this rank's shard -> the whole sequence
            cu = inputs.get("cu_seq_lens_q")
            if cu is None and self.cp_layout == "doc_zigzag" and inputs.get("position_ids") is not None:
                cu = _documents_from_position_ids(inputs["position_ids"].reshape(-1))
            gather = lambda t: gather_sequence(t, self.cp_group, self.cp_layout, cu_seqlens=cu)  # noqa: E731
            logits = tuple(map(gather, logits)) if isinstance(logits, tuple) else gather(logits)
        return loss, logits, labels


def __getattr__(name: str):
    """``RingAttentionTrainer`` (``RingAttentionMixin`` + ``transformers.Trainer``), built on first use
    so that importing this module does not import the Trainer (and accelerate)."""
    if name == "RingAttentionTrainer":
        import transformers

        cls = type(
            "RingAttentionTrainer",
            (RingAttentionMixin, transformers.Trainer),
            {
                "__module__": __name__,
                "__doc__": "transformers.Trainer with context parallelism over ring attention: "
                "``RingAttentionTrainer(model=..., args=..., train_dataset=..., cp_size=2)`` under "
                "torchrun. See ``RingAttentionMixin``.",
            },
        )
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
