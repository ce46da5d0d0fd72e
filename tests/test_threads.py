"""Thread counts around a forward (hetero_rt.kernels.threads): a decode forward (a few tokens) runs
torch on one thread and restores the caller's count afterwards; a prefill forward keeps the caller's
count; the logits do not depend on it."""
import numpy as np
import pytest
import torch

import hetero_rt
from hetero_rt.kernels.stored import GEMV_MAX_TOKENS
from hetero_rt.kernels.threads import torch_threads


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", synthetic_config("tiny"),
                                      seed=0, dtype="float32")


def test_torch_threads_restores_the_count_also_on_error():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_decode_forward_runs_torch_on_one_thread(tiny):
    rt = hetero_rt.load(tiny, dtype="float32")
    seen = []
    hook = rt.model.layers[0].register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        prefill = rt.step(torch.arange(GEMV_MAX_TOKENS + 4), 0)
        decode = rt.step(torch.tensor([5]), GEMV_MAX_TOKENS + 4)
        assert seen == [2, 1] and torch.get_num_threads() == 2
        torch.set_num_threads(1)
        full = rt.step(torch.cat([torch.arange(GEMV_MAX_TOKENS + 4), torch.tensor([5])]), 0)
    finally:
        hook.remove()
        torch.set_num_threads(before)
    np.testing.assert_allclose(torch.cat([prefill, decode]).numpy(), full.numpy(), rtol=0, atol=1e-4)
