"""The harness itself: the interpreter bf16 fix is needed and works; the tolerance rule bites."""

import pytest
import torch
from harness import (
    HAS_GPU,
    assert_within_peer_error,
    interpreter_without_bf16_fix,
    nan_filled,
    nan_poisoning_installed,
)

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    rows = tl.arange(0, N)[:, None] * N
    cols = tl.arange(0, N)[None, :]
    a = tl.load(a_ptr + rows + cols)
    b = tl.load(b_ptr + rows + cols)
    tl.store(c_ptr + rows + cols, tl.dot(a, b))


def _run_dot(a, b):
    c = nan_filled(a.shape[0], b.shape[1])
    _dot_kernel[(1,)](a, b, c, N=a.shape[0])
    return c


@pytest.mark.skipif(HAS_GPU, reason="the interpreter is only used on machines without a GPU")
def test_bf16_dot_needs_the_fix_and_the_fix_works():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    b = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    exact = a.double() @ b.double()  # bf16 products are exact in fp32; only the sum rounds
    with interpreter_without_bf16_fix():
        broken = _run_dot(a, b)
    fixed = _run_dot(a, b)
    assert not torch.allclose(broken.double(), exact, atol=1e-2), "unpatched bf16 tl.dot was already right"
    torch.testing.assert_close(fixed.double(), exact, atol=1e-5, rtol=1e-5)


@triton.jit
def _to_bf16_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))


@pytest.mark.skipif(HAS_GPU, reason="the interpreter is only used on machines without a GPU")
def test_fp32_to_bf16_cast_needs_the_fix_and_rounds_to_nearest_with_it():
    gen = torch.Generator().manual_seed(2)
    x = torch.cat((torch.randn(1020, generator=gen), torch.tensor([1.0 + 2**-8, 255.99, -3.999, 1e-40])))
    expected = x.to(torch.bfloat16)  # torch rounds to nearest even, as the GPU's cvt.rn does
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    with interpreter_without_bf16_fix():
        _to_bf16_kernel[(1,)](x, y, N=x.numel())
    assert not torch.equal(y, expected), "the unpatched interpreter already rounded to nearest"
    _to_bf16_kernel[(1,)](x, y, N=x.numel())
    assert torch.equal(y, expected)


@pytest.mark.skipif(HAS_GPU, reason="the interpreter is only used on machines without a GPU")
def test_fp32_dot_unchanged_by_the_fix():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 16, generator=gen), torch.randn(16, 16, generator=gen)
    torch.testing.assert_close(_run_dot(a, b).double(), a.double() @ b.double(), atol=1e-4, rtol=1e-5)


def test_tolerance_rule_accepts_within_and_rejects_beyond_peer_error():
    ref = torch.linspace(-1, 1, 101, dtype=torch.float64)
    peer = ref + 1e-3
    assert_within_peer_error(ref + 1.9e-3, ref, peer, factor=2.0, eps=0.0)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_within_peer_error(ref + 2.1e-3, ref, peer, factor=2.0, eps=0.0)


def test_tolerance_rule_rejects_unwritten_nan_outputs():
    ref = torch.zeros(4, dtype=torch.float64)
    ours = nan_filled(4)
    ours[:3] = 0.0  # one element never written
    with pytest.raises(AssertionError, match="non-finite"):
        assert_within_peer_error(ours, ref, ref.float())


def _allocations_from(module_name):
    """Allocations made by code whose module is ``module_name`` (as the poisoning sees its caller)."""
    namespace = {"__name__": module_name, "torch": torch}
    exec(
        "def allocate(like):\n"
        "    return {\n"
        "        'empty': torch.empty(3, 5, dtype=like.dtype, device=like.device),\n"
        "        'empty_like': torch.empty_like(like),\n"
        "        'empty_strided': torch.empty_strided((3, 5), (1, 3), dtype=like.dtype, device=like.device),\n"
        "        'new_empty': like.new_empty((2, 7)),\n"
        "    }\n",
        namespace,
    )
    return namespace["allocate"]


@pytest.mark.parametrize("package", ["ringattn.backends.probe", "tritonkernels.probe"])
def test_nan_poisoning_is_active_for_the_packages(package):
    # conftest installs it for the whole session: floats NaN, signed ints their minimum.
    assert nan_poisoning_installed()
    allocate = _allocations_from(package)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for name, t in allocate(torch.zeros(4, 2, dtype=dtype)).items():
            assert t.dtype == dtype and torch.isnan(t).all(), (name, dtype)
    for name, t in allocate(torch.zeros(4, 2, dtype=torch.int32)).items():
        assert (t == torch.iinfo(torch.int32).min).all(), name
    assert allocate(torch.zeros(2, dtype=torch.bool))["empty"].dtype == torch.bool  # left as allocated
    grad = torch.zeros(2, requires_grad=True)
    assert torch.isnan(_allocations_from(package)(grad)["empty_like"]).all()


def test_nan_poisoning_reaches_a_real_backend_allocation():
    from ringattn.backends.compiled import _forward_outputs, _gradients

    q = torch.zeros(1, 5, 2, 8, dtype=torch.bfloat16)
    assert all(torch.isnan(t).all() for t in (*_forward_outputs(q, False), *_gradients(q, q, True)))


def test_nan_poisoning_leaves_meta_and_fake_tensors_alone():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    allocate = _allocations_from("ringattn.probe")
    for t in allocate(torch.zeros(4, 2, device="meta")).values():
        assert t.is_meta
    with FakeTensorMode() as mode:
        fakes = allocate(mode.from_tensor(torch.zeros(4, 2)))
    assert all(isinstance(t, FakeTensor) for t in fakes.values())


def test_nan_poisoning_traces_under_torch_compile():
    # dynamo inlines ringattn code that calls the patched torch.empty: the fill must neither break
    # the graph (fullgraph=True raises on a break) nor enter it.
    from ringattn.backends.compiled import _forward_outputs

    def fn(x):
        out, lse = _forward_outputs(x, False)
        return out.shape[1] + lse.shape[1] + x

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    x = torch.ones(1, 3, 2, 4)
    torch.testing.assert_close(compiled(x), x + 5)
