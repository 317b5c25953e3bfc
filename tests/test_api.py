"""Drop-in APIs (flash-attn / SDPA style) and their custom ops: values, gradients, errors, compile."""

import pytest
import torch
import torch.nn.functional as F
from attention_checks import peer_attention
from harness import GRAD_FACTOR, OUTPUT_FACTOR, assert_within_peer_error

import ringattn
from ringattn import RoPEConfig, attention_ref
from ringattn.api import flash_attn_func, flash_attn_varlen_func, scaled_dot_product_attention


def _qkv(B, Sq, Sk, Hq, Hkv, D, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, Sq, Hq, D, generator=gen).to(dtype),
        torch.randn(B, Sk, Hkv, D, generator=gen).to(dtype),
        torch.randn(B, Sk, Hkv, D, generator=gen).to(dtype),
    )


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(torch.ones_like(out) * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize(
    "Sq,Sk,with_rope",
    [(24, 24, False), (10, 24, False), (24, 10, False), (24, 24, True), (10, 24, True)],
    ids=["square", "fewer-q", "more-q", "square-rope", "fewer-q-rope"],  # more-q with positions: rejected
)
def test_flash_attn_func_bottom_right_causal_values_and_grads(Sq, Sk, with_rope):
    q, k, v = _qkv(2, Sq, Sk, 4, 2, 16)
    rope = RoPEConfig(16, theta=45.2e9) if with_rope else None
    positions = torch.arange(4_000_000, 4_000_000 + Sk) if with_rope else None
    # Bottom-right alignment in global indices: query i sits at index Sk - Sq + i.
    q_index = torch.arange(Sk - Sq, Sk)

    def ours(q, k, v):
        return flash_attn_func(q, k, v, causal=True, rope=rope, positions=positions)

    qp, kp = (positions[Sk - Sq :], positions) if with_rope else (None, None)
    spec = dict(causal=True, q_index=q_index, rope=rope, q_positions=qp, k_positions=kp)

    def ref(q, k, v):
        return attention_ref(q, k, v, **spec)[0]

    def peer(q, k, v):  # plain torch in fp32 with the same mask (rows before the first key: zeros)
        return peer_attention(q, k, v, **spec)[0]

    ours_r = _grads(ours, q, k, v)
    ref_r = _grads(ref, q.double(), k.double(), v.double())
    peer_r = _grads(peer, q, k, v)
    for name, a, r, p in zip(("out", "dq", "dk", "dv"), ours_r, ref_r, peer_r, strict=True):
        factor = OUTPUT_FACTOR if name == "out" else GRAD_FACTOR
        assert_within_peer_error(a, r, p, factor=factor, name=name)
    if Sq > Sk:
        assert (ours_r[0][:, : Sq - Sk] == 0).all()


def test_flash_attn_func_return_lse_and_errors():
    q, k, v = _qkv(1, 8, 8, 2, 2, 8)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    ref_out, ref_lse = attention_ref(q, k, v, causal=True)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_func(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="positions"):
        flash_attn_func(q, k, v, rope=RoPEConfig(8), positions=torch.arange(5))


def test_varlen_equals_documents_run_separately():
    lengths = [5, 17, 42]
    cu = torch.tensor([0, 5, 22, 64], dtype=torch.int32)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(64, 4, 16, generator=gen)
    k, v = torch.randn(64, 2, 16, generator=gen), torch.randn(64, 2, 16, generator=gen)
    rope = RoPEConfig(16, theta=5e5)
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True, rope=rope)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        alone = flash_attn_func(
            q[None, start:end], k[None, start:end], v[None, start:end], causal=True, rope=rope
        )
        torch.testing.assert_close(out[start:end], alone[0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="as many sequences"):
        flash_attn_varlen_func(q, k, v, cu, torch.tensor([0, 64]), 64, 64)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        flash_attn_varlen_func(q, k, v, torch.tensor([1, 64]), torch.tensor([1, 64]), 64, 64)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sdpa_signature_matches_torch(causal):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 8, 19, 16, generator=gen)
    k, v = torch.randn(2, 2, 19, 16, generator=gen), torch.randn(2, 2, 19, 16, generator=gen)
    ours = scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True, scale=0.2)
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))  # (B, S, H, D), as the spec and peer take them
    ref = attention_ref(q_, k_, v_, causal=causal, softmax_scale=0.2)[0].transpose(1, 2)
    peer = peer_attention(q_, k_, v_, causal=causal, softmax_scale=0.2)[0].transpose(1, 2)
    torch_sdpa = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=causal, enable_gqa=True, scale=0.2
    )
    torch.testing.assert_close(ref, torch_sdpa, rtol=0, atol=1e-12)  # the spec is torch's semantics
    assert_within_peer_error(ours, ref, peer)
    with pytest.raises(NotImplementedError, match="attn_mask"):  # a mask that is not key padding
        scaled_dot_product_attention(q, k, v, attn_mask=torch.eye(19, dtype=torch.bool), enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        scaled_dot_product_attention(q, k, v)


def test_autograd_saves_only_q_k_v_out_lse():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 12, 12, 4, 2, 16))
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        flash_attn_func(q, k, v, causal=True, rope=RoPEConfig(16))
    assert sorted(saved) == sorted(
        [(1, 12, 4, 16), (1, 12, 2, 16), (1, 12, 2, 16), (1, 12, 4, 16), (1, 4, 12)]
    )


class _TinyAttentionBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(64, 64 + 32 + 32)
        self.proj = torch.nn.Linear(64, 64)
        self.rope = RoPEConfig(16, theta=5e5)

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).split((64, 32, 32), dim=-1)
        q, k, v = q.view(B, S, 4, 16), k.view(B, S, 2, 16), v.view(B, S, 2, 16)
        return self.proj(flash_attn_func(q, k, v, causal=True, rope=self.rope).reshape(B, S, 64))


def test_torch_compile_fullgraph_model_matches_eager():
    # fullgraph=True raises on any graph break; inductor compiles the rest of the model around the op.
    torch.manual_seed(0)
    model, x = _TinyAttentionBlock(), torch.randn(2, 24, 64)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x)
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-5)


def test_public_names_exported():
    for name in ("flash_attn_func", "flash_attn_varlen_func", "scaled_dot_product_attention"):
        assert callable(getattr(ringattn, name))


@pytest.mark.parametrize(
    "structure", ["padding", "causal-left-padding", "causal-right-padding", "decode-left-padding"]
)
def test_sdpa_boolean_padding_masks_match_torch(structure):
    """The boolean masks transformers builds, against torch SDPA in fp64 on every row that sees a key
    (for causal right padding: on the real tokens; the padding rows output 0 by contract)."""
    gen = torch.Generator().manual_seed(9)
    Sq, Sk = (2, 11) if structure == "decode-left-padding" else (11, 11)
    q = torch.randn(3, 4, Sq, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(3, 2, Sk, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    valid = torch.ones(3, Sk, dtype=torch.bool)
    if structure == "causal-right-padding":
        valid[0, 7:] = valid[1, 10:] = False
    else:
        valid[0, :4] = valid[1, :1] = False
    mask = valid[:, None, None, :].expand(3, 1, Sq, Sk)
    if structure != "padding":
        mask = mask & (torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + Sk - Sq)
    ours = scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    rows = mask.any(-1).expand(3, 4, Sq)  # torch gives NaN on rows that see nothing
    if structure == "causal-right-padding":
        rows = rows & valid[:, None, :]
        assert (ours[~valid[:, None, :].expand(3, 4, Sq)] == 0).all()
    torch.testing.assert_close(ours[rows], want[rows], atol=1e-12, rtol=0)
