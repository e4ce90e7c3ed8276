"""The streaming-read kernel (the read floor of memory-bound kernels) against its reference."""

import pytest
import torch

from mlsys24.kernels.stream import READ_GRID, ReadConfig, read_floor, stream_read, stream_read_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: the Triton interpreter (conftest)


@pytest.mark.parametrize("n_words", [1, 127, 128, 1000, 4096, 5003])
@pytest.mark.parametrize("cfg", [ReadConfig(128, 1, 1), ReadConfig(256, 3, 2), ReadConfig(512, 2, 4)])
def test_stream_read_matches_reference(n_words, cfg):
    g = torch.Generator().manual_seed(n_words)
    buf = torch.randint(-(1 << 31), (1 << 31) - 1, (n_words,), dtype=torch.int32, generator=g).to(DEV)
    got = stream_read(buf, cfg)
    assert got.shape == (max(1, -(-n_words // (cfg.block * cfg.steps))),)
    assert torch.equal(got, stream_read_ref(buf, cfg))


@pytest.mark.parametrize("dtype", [torch.float16, torch.uint8, torch.float32])
def test_stream_read_any_dtype_reads_every_word(dtype):
    buf = torch.arange(2048, dtype=torch.int32, device=DEV).view(dtype)
    cfg = ReadConfig(256, 2, 2)
    base = stream_read(buf, cfg)
    assert torch.equal(base, stream_read_ref(buf, cfg))
    # flipping one bit of the last word changes the last program's result: every word is read
    buf2 = buf.clone()
    buf2.view(torch.int32)[-1] ^= 1
    got = stream_read(buf2, cfg)
    assert torch.equal(got[:-1], base[:-1]) and not torch.equal(got[-1], base[-1])


def test_stream_read_rejects_bad_input():
    with pytest.raises(ValueError, match="4-byte"):
        stream_read(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="contiguous"):
        stream_read(torch.zeros(64, 64, dtype=torch.int32).t())
    with pytest.raises(ValueError, match="block"):
        ReadConfig(block=100)
    with pytest.raises(ValueError, match="pdl"):
        ReadConfig(pdl="sometimes")
    with pytest.raises(ValueError, match="nbytes"):
        read_floor(0, "cpu")
    with pytest.raises(ValueError, match="chain"):
        read_floor(1024, "cpu", chain=0)
    with pytest.raises(ValueError, match="pdl"):
        stream_read(torch.zeros(256, dtype=torch.int32), ReadConfig(128, 1, 1, pdl="wait_first"))


def test_read_floor_smoke():
    r = read_floor(4096 * 4, DEV, chain=2, repeats=2, tune_repeats=1, configs=[ReadConfig(1024, 2, 4)])
    assert r["chain"] == 2 and r["nbytes"] == 4096 * 4
    assert read_floor(4099, DEV, repeats=1, tune_repeats=1, configs=[ReadConfig(128, 1, 1)])["nbytes"] == 4160
    assert {c["provider"] for c in r["candidates"]} == {"torch_sum", "triton"}
    assert r["median_us"] == pytest.approx(r["nbytes"] / r["GBps"] / 1e3)
    assert r["provider"] in {"torch_sum", "triton"} and len(r["candidates"]) == 2


def test_read_grid_is_valid():
    assert all(isinstance(c, ReadConfig) for c in READ_GRID) and len(set(READ_GRID)) == len(READ_GRID)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", ["off", "wait_first", "wait_last"])
def test_gpu_stream_read_chain(pdl):
    from mlsys24.bench import CUDAGraphed
    from mlsys24.kernels import pdl_supported

    if pdl != "off" and not pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability >= 9.0")
    bufs = [torch.randint(-(1 << 30), 1 << 30, (3_000_001,), dtype=torch.int32, device="cuda") for _ in range(4)]
    cfg = ReadConfig(4096, 4, 8, pdl=pdl)
    g = CUDAGraphed(lambda: [stream_read(b, cfg) for b in bufs])
    g.replay()
    torch.cuda.synchronize()
    for b, o in zip(bufs, g.out):
        assert torch.equal(o, stream_read_ref(b, cfg))
    r = read_floor(8 << 20, "cuda", chain=2, repeats=10, tune_repeats=3, configs=READ_GRID[:2],
                   pdl_modes=("wait_first",))
    # torch.sum, and each configuration plain and with PDL (the L2 prefetch is tried for single reads only)
    assert r["GBps"] > 100 and len(r["candidates"]) == 1 + 2 * 2
    assert all(not (c["config"] or {}).get("l2_prefetch") for c in r["candidates"])
