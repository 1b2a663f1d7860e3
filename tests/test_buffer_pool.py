"""The CPU buffer pool of the fast kernels (`timo_hf.buffer_pool`): a buffer is handed out again only once nothing
uses its memory, the pool keeps within its limit, and two graphs alive at once through the same attention module
(whose saved tensors come from the pool) give the gradients of two separate steps."""

import threading

import pytest
import torch

from timo_hf import TiMoConfig, attention_fast, buffer_pool
from timo_hf.modeling_timo import TiMoAttention


MIB = 1 << 20


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch):
    """Every test starts from an empty pool of this thread, with the default limit."""
    monkeypatch.delenv("TIMO_CPU_BUFFER_POOL_MB", raising=False)
    buffer_pool.release_buffers()
    yield
    buffer_pool.release_buffers()


def pooled(megabytes: float, shape_tail: int = 1) -> torch.Tensor | None:
    numel = int(megabytes * MIB) // 4
    with torch.no_grad(), buffer_pool.pooling():
        return buffer_pool.pooled_empty((numel // shape_tail, shape_tail), torch.float32, torch.empty(0))


def memory(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_a_buffer_is_handed_out_again_only_once_nothing_uses_its_memory():
    """A view keeps its buffer in use; once released, the buffer (the smallest free one large enough) is reused."""
    first = pooled(2)
    held = memory(first)
    view = first[1:]
    del first
    second = pooled(2)  # `view` still uses the first buffer
    assert memory(second) != held
    released = memory(second)
    del second
    assert memory(pooled(2)) == released
    del view
    both = pooled(2), pooled(2)
    assert {memory(tensor) for tensor in both} == {held, released}
    assert buffer_pool.pooled_bytes() == 4 * MIB


def test_a_buffer_saved_for_backward_is_not_overwritten():
    """A buffer autograd holds (here one saved by `mul`) is in use: the next request gets other memory."""
    weight = torch.randn(4, requires_grad=True)
    buffer = pooled(2, shape_tail=4).normal_()
    product = buffer * weight  # saves `buffer` for the weight's gradient
    expected = buffer.sum(0)
    held = memory(buffer)
    del buffer
    other = pooled(2, shape_tail=4)
    assert memory(other) != held
    other.fill_(float("nan"))
    (grad_weight,) = torch.autograd.grad(product.sum(), weight)
    torch.testing.assert_close(grad_weight, expected)


def test_the_pool_keeps_within_its_limit_and_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("TIMO_CPU_BUFFER_POOL_MB", "5")
    kept = [pooled(2), pooled(2)]
    assert buffer_pool.pooled_bytes() == 4 * MIB
    beyond = pooled(3)  # no free buffer to drop: served, not kept
    assert beyond is not None and buffer_pool.pooled_bytes() == 4 * MIB
    del kept
    pooled(3)  # the two free 2 MiB buffers make room
    assert buffer_pool.pooled_bytes() <= 5 * MIB
    monkeypatch.setenv("TIMO_CPU_BUFFER_POOL_MB", "0")
    assert pooled(2) is None
    monkeypatch.setenv("TIMO_CPU_BUFFER_POOL_MB", "lots")
    with pytest.raises(ValueError, match="TIMO_CPU_BUFFER_POOL_MB"):
        pooled(2)


def test_no_pooled_buffer_outside_the_pooling_scope_where_autograd_records_or_for_small_tensors():
    like = torch.empty(0)
    with buffer_pool.pooling():
        assert buffer_pool.pooled_empty((MIB,), torch.float32, like) is None  # grad mode on
    with torch.no_grad():
        assert buffer_pool.pooled_empty((MIB,), torch.float32, like) is None  # outside the scope
        with buffer_pool.pooling():
            assert buffer_pool.pooled_empty((16,), torch.float32, like) is None
            assert buffer_pool.pooled_empty((MIB,), torch.float32, like) is not None
            with buffer_pool.pooling(False):
                assert buffer_pool.pooled_empty((MIB,), torch.float32, like) is None


def test_each_thread_has_its_own_pool():
    pooled(2)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(buffer_pool.pooled_bytes()))
    thread.start()
    thread.join()
    assert seen == [0] and buffer_pool.pooled_bytes() == 2 * MIB


def test_buffers_of_inference_mode_serve_only_inference_mode():
    with torch.inference_mode():
        inference = pooled(2)
        assert inference.is_inference()
        held = memory(inference)
        del inference
    normal = pooled(2)
    assert not normal.is_inference() and memory(normal) != held


@pytest.mark.parametrize("attention", ["stga", "dstga"])
def test_two_graphs_alive_at_once_give_the_gradients_of_two_separate_steps(attention, monkeypatch):
    """Every tensor of the fast kernels pooled (no size threshold): the second forward must not reuse what the
    first one saved for its backward."""
    monkeypatch.setattr(buffer_pool, "MIN_POOLED_BYTES", 0)
    torch.manual_seed(0)
    config = TiMoConfig.from_preset("base", stga_implementation="fast")
    module = TiMoAttention(config, 16, 2, attention).double()
    frames, tokens = 5, 9
    inputs = [torch.randn(2, frames * tokens, 16, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    grads = [torch.randn(2, frames * tokens, 16, dtype=torch.float64) for _ in range(2)]

    def step(hidden, grad):
        output = module(hidden, frames)
        return output, torch.autograd.grad(output, (hidden, *module.parameters()), grad)

    separate = [step(hidden, grad) for hidden, grad in zip(inputs, grads)]
    outputs = [module(hidden, frames) for hidden in inputs]
    together = torch.autograd.grad(outputs, (*inputs, *module.parameters()), grads)
    for output, (expected_output, _) in zip(outputs, separate):
        torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    torch.testing.assert_close(together[0], separate[0][1][0], rtol=0, atol=0)
    torch.testing.assert_close(together[1], separate[1][1][0], rtol=0, atol=0)
    for together_grad, *each in zip(together[2:], separate[0][1][1:], separate[1][1][1:]):
        torch.testing.assert_close(together_grad, each[0] + each[1], rtol=1e-12, atol=1e-12)


def run_attention_step(tokens: int, frames: int = 3) -> None:
    torch.manual_seed(0)
    module = TiMoAttention(TiMoConfig.from_preset("base", stga_implementation="fast"), 16, 2, "dstga")
    hidden = torch.randn(1, frames * tokens, 16, requires_grad=True)
    module(hidden, frames).sum().backward()


def test_the_kernels_pool_only_for_frames_of_at_most_pooled_max_tokens(monkeypatch):
    monkeypatch.setattr(buffer_pool, "MIN_POOLED_BYTES", 0)
    monkeypatch.setattr(attention_fast, "POOLED_MAX_TOKENS", 8)
    run_attention_step(tokens=9)
    assert buffer_pool.pooled_bytes() == 0
    run_attention_step(tokens=8)
    assert buffer_pool.pooled_bytes() > 0
