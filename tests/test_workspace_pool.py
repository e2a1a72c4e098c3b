"""The CPU workspace pool of the C++ LSTM (backends/ext_lstm.WorkspacePool): a pooled buffer is handed
out again only once nothing but the pool references it, from any number of threads; inference outputs
come from it."""
import threading

import pytest
import torch

from fastinterest import _ext

ext_lstm = pytest.importorskip("fastinterest.backends.ext_lstm")
needs_ext = pytest.mark.skipif(_ext.cpu_reason() is not None, reason="the C++ CPU extension is not built")


def _pool():
    return ext_lstm.WorkspacePool(max_bytes=64 << 20, min_bytes=1 << 16)


def test_a_referenced_buffer_is_never_handed_out_again():
    pool = _pool()
    a = pool.empty((300, 100), torch.float32)
    a.fill_(1.0)
    b = pool.empty((300, 100), torch.float32)   # a is alive: another buffer
    assert a.data_ptr() != b.data_ptr()
    b.fill_(2.0)
    assert bool((a == 1.0).all())
    view = a[5]                                 # a view keeps the storage alive, too
    ptr = a.data_ptr()
    del a
    c = pool.empty((300, 100), torch.float32)
    assert c.data_ptr() != ptr and c.data_ptr() != b.data_ptr()
    c.fill_(3.0)
    assert bool((view == 1.0).all())


def test_a_dropped_buffer_is_reused_with_the_right_shape_and_dtype():
    pool = _pool()
    a = pool.empty((256, 1000), torch.float32)
    ptr = a.data_ptr()
    del a
    b = pool.empty((500, 250), torch.float64)   # fits in the dropped buffer (at most 2x its need)
    assert b.data_ptr() == ptr
    assert b.shape == (500, 250) and b.dtype == torch.float64 and b.is_contiguous()
    b.fill_(0.5)                                # the whole tensor is inside the buffer
    assert float(b.sum()) == 0.5 * 125_000
    small = pool.empty((10,), torch.float32)    # under min_bytes: a plain tensor
    assert small.numel() == 10


@needs_ext
def test_large_buffers_are_2mib_aligned_and_reused():
    pool = _pool()
    t = pool.empty((4 << 20,), torch.float32)   # 16 MiB: huge-page advised, so 2 MiB aligned
    assert t.data_ptr() % (1 << 21) == 0
    ptr = t.data_ptr()
    del t
    for _ in range(3):                          # dropped, it is handed out again: the pool does not grow
        u = pool.empty((2 << 20, 2), torch.float32)
        assert u.data_ptr() == ptr
        del u
    assert len(pool.bufs) == 1


def test_threads_never_share_a_live_buffer():
    pool = _pool()
    errors = []
    start = threading.Barrier(4)

    def work(k):
        try:
            start.wait()
            for i in range(200):
                t = pool.empty((200, 100), torch.float32)
                t.fill_(float(k))
                # another thread writing into the same buffer would show here
                if not bool((t == float(k)).all()):
                    errors.append((k, i))
                del t
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


@needs_ext
def test_inference_outputs_stay_valid_while_held():
    import fastinterest.nn as fnn

    torch.manual_seed(0)
    m = fnn.EmbeddingLSTM(5000, 16, 64).eval()
    ids = torch.randint(0, 5000, (128, 50))    # output 1.6 MB: pooled
    lengths = torch.randint(0, 51, (128,))
    with torch.inference_mode():
        out1, _ = m(ids, lengths)
        keep = out1.clone()
        out2, _ = m(torch.randint(0, 5000, (128, 50)), lengths)   # must not land in out1's buffer
        assert out1.data_ptr() != out2.data_ptr()
        assert torch.equal(out1, keep)
        del out1
        out3, _ = m(ids, lengths)
        assert torch.equal(out3, keep)


def test_eviction_when_the_pool_is_full():
    pool = ext_lstm.WorkspacePool(max_bytes=3 << 20, min_bytes=1 << 16)
    a = pool.empty((1 << 18,), torch.float32)   # 1 MiB
    b = pool.empty((3 << 17,), torch.float32)   # 1.5 MiB
    a.fill_(1.0)
    del b
    c = pool.empty((1 << 19,), torch.float32)   # 2 MiB: b's buffer is too small, and a is alive, so
    c.fill_(2.0)                                # b's is evicted to make room
    assert bool((a == 1.0).all()) and bool((c == 2.0).all())
    assert sum(buf.numel() for buf in pool.bufs) <= 3 << 20
    d = pool.empty((1 << 19,), torch.float32)   # nothing free to evict: a plain tensor, still correct
    d.fill_(3.0)
    assert bool((c == 2.0).all()) and bool((a == 1.0).all())
