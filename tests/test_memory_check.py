"""load() compares the memory planner's total with this machine's memory before loading anything
(issue 13, item 3): short, it raises MemoryBudgetError saying how much is needed, what the machine has
and, for a GGUF placed by rules that expand it, that the default in-place placement fits."""
import collections
from pathlib import Path
from unittest import mock

import pytest

import hetero_rt
from gguf_models import KQUANT_DIMS, make_gguf
from hetero_rt.api import make_plan
from hetero_rt.checkpoint.source import open_source
from hetero_rt.cli import main
from hetero_rt.errors import MemoryBudgetError
from hetero_rt.placement.memory import plan_memory

VM = collections.namedtuple("VM", "total available")
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def q4k(tmp_path_factory):
    return make_gguf("v3", tmp_path_factory.mktemp("mem"), "Q4_K", **KQUANT_DIMS)[1]


def _need(path, rules):
    src = open_source(path)
    args = src.args()
    plan = make_plan(args, rules, None, False, in_place=True)
    mem = plan_memory(args, plan, src.tensor_meta(args), 64, plan.main.dtype or src.embedding_dtype())
    return mem.devices["cpu"].total


def _ram(total: int):
    return mock.patch("psutil.virtual_memory", return_value=VM(total, total // 2))


def test_a_placement_that_does_not_fit_is_refused_before_loading_and_the_default_is_suggested(q4k):
    rules = ROOT / "placement_rules" / "cpu-only.yaml"       # dequantizes the GGUF to float32
    expanded, in_place = _need(q4k, rules), _need(q4k, None)
    assert in_place < expanded
    with _ram((in_place + expanded) // 2), mock.patch("hetero_rt.api.load_model") as loaded:
        with pytest.raises(MemoryBudgetError, match=r"needs cpu .* but this machine has cpu .*the default "
                                                    r"placement \(no --rules.*fits"):
            hetero_rt.load(q4k, rules, context=64)
        loaded.assert_not_called()
    with _ram(in_place // 2), mock.patch("hetero_rt.api.load_model") as loaded:
        with pytest.raises(MemoryBudgetError, match="place part of the model on a GPU"):
            hetero_rt.load(q4k, None, context=64)
        loaded.assert_not_called()


def test_the_check_can_be_skipped_and_a_placement_that_fits_loads(q4k):
    with _ram(_need(q4k, None) // 2):
        rt = hetero_rt.load(q4k, None, context=64, check_memory=False)
    assert rt.logits([1, 2, 3]).shape[-1] == rt.args.vocab_size
    rt = hetero_rt.load(q4k, None, context=64)                 # this machine's real RAM: fits


def test_the_cli_says_so_in_one_line(q4k, capsys):
    with _ram(_need(q4k, None) // 2):
        assert main(["run", "--model", str(q4k), "--prompt", "x", "--context", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("hetero-rt: error:") == 1 and "--skip-memory-check" in err
