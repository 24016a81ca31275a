"""The host-read guard (specdec/host_reads.py): every forbidden call raises inside a region, with a one-line error
naming the op and the calling line, and runs outside it; fixed-shape tensor code runs inside unchanged. Each case
runs both plain and under inference_mode, where torch dispatches composite ops (item, where, to) unexpanded."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from specdec.host_reads import HostReadError, check_no_host_reads, no_host_reads

x = torch.arange(6.0)
mask = x > 2
ids = torch.tensor([1, 2])
meta = torch.empty(2, device="meta")  # another device than the host, on any machine

SCALAR = "_local_scalar_dense|item"  # eager dispatch expands .item() to _local_scalar_dense, inference_mode does not
FORBIDDEN: dict[str, tuple[Callable[[], object], str]] = {  # case -> (call, the op the error names: a regex)
    "item": (lambda: x[0].item(), SCALAR),
    "int": (lambda: int(x[1]), SCALAR),
    "float": (lambda: float(x[1]), SCALAR),
    "bool": (lambda: bool(x[1]), SCALAR + "|is_nonzero"),
    "if": (lambda: 1 if x[1] else 0, SCALAR + "|is_nonzero"),
    "index a list": (lambda: [1, 2, 3][ids[0]], SCALAR),
    "tolist": (lambda: x.tolist(), r"tolist\(\)"),
    "numpy": (lambda: x.numpy(), r"numpy\(\)"),
    "np.asarray": (lambda: np.asarray(x), r"__array__\(\)"),
    "nonzero": (lambda: x.nonzero(), "nonzero"),
    "nonzero as_tuple": (lambda: torch.nonzero(x, as_tuple=True), "nonzero|nonzero_numpy"),
    "where, one argument": (lambda: torch.where(mask), "nonzero|where"),
    "argwhere": (lambda: torch.argwhere(x), "nonzero|argwhere"),
    "mask index": (lambda: x[mask], "index"),
    "mask assignment": (lambda: x.clone().__setitem__(mask, 0.0), "index_put_"),
    "masked_select": (lambda: x.masked_select(mask), "masked_select"),
    "unique": (lambda: torch.unique(x), "_unique2"),
    "unique_consecutive": (lambda: x.unique_consecutive(), "unique_consecutive"),
    "bincount": (lambda: torch.bincount(ids), "bincount"),
    "repeat_interleave repeats": (lambda: torch.repeat_interleave(ids), "repeat_interleave"),
    "repeat_interleave tensor": (lambda: x[:2].repeat_interleave(ids), "repeat_interleave"),
    "one_hot": (lambda: F.one_hot(ids, 4), SCALAR + "|one_hot"),  # a CPU checks the ids' range with .item()
    "equal": (lambda: torch.equal(x, x), "equal"),
    "allclose": (lambda: torch.allclose(x, x), SCALAR + "|allclose"),
    "multinomial": (lambda: torch.multinomial(x + 1, 1), "multinomial"),
    "masked_fill tensor value": (lambda: x.masked_fill(mask, torch.tensor(1.0)), "masked_fill"),
    ".cpu()": (lambda: meta.cpu(), "_to_copy|to"),
    ".to('cpu')": (lambda: meta.to("cpu"), "_to_copy|to"),
    "copy_ into the host": (lambda: torch.empty(2).copy_(meta), "copy_"),
}

ALLOWED: dict[str, Callable[[], object]] = {
    "integer index (a gather)": lambda: x[ids],
    "repeat_interleave int": lambda: x.repeat_interleave(2),
    "repeat_interleave output_size": lambda: x[:2].repeat_interleave(ids, output_size=3),
    "masked_fill number": lambda: x.masked_fill(mask, 1.0),
    "where, three arguments": lambda: torch.where(mask, x, 0.0),
    "nonzero_static": lambda: torch.nonzero_static(x, size=6),
    "index_put integer": lambda: x.clone().index_put_((ids,), torch.tensor(0.0)),
    ".cpu() of a host tensor": lambda: x.cpu(),
    "shape": lambda: x.shape[0] + len(x),
}


def pure_step(h: torch.Tensor, w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """What a decode step may do: GEMMs, norms, softmax, top-k routing, gathers, scatters, masks as values."""
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    scores = (h @ w).softmax(-1)
    top = scores.topk(2, dim=-1)
    routed = torch.zeros_like(scores).scatter_(1, top.indices, top.values)
    rows = table.index_select(0, top.indices[:, 0]) + table[top.indices[:, 1]]
    keep = torch.where(scores > 0.1, scores, torch.zeros((), dtype=scores.dtype))
    return (routed @ table + rows).cumsum(0) + keep.sum(-1, keepdim=True) + scores.argmax(-1, keepdim=True)


@pytest.fixture(params=[False, True], ids=["eager", "inference_mode"])
def mode(request: pytest.FixtureRequest) -> contextlib.AbstractContextManager:
    return torch.inference_mode() if request.param else contextlib.nullcontext()


@pytest.mark.parametrize("case", list(FORBIDDEN))
def test_forbidden_call_raises_inside_only(case: str, mode: contextlib.AbstractContextManager) -> None:
    fn, op = FORBIDDEN[case]
    with mode:
        with pytest.raises(HostReadError) as e, no_host_reads():
            fn()
        msg = str(e.value)
        assert "\n" not in msg and re.match(rf"(aten|Tensor)\.({op}) ", msg), msg
        assert "inside a no-host-reads region" in msg, msg
        assert f"{__file__}:" in msg, msg  # the line that made the read
        if case in (".cpu()", ".to('cpu')", "copy_ into the host"):
            assert "copies a meta tensor to the host" in msg
            with pytest.raises(NotImplementedError):  # outside, torch itself refuses to copy meta data
                fn()
        else:
            fn()


@pytest.mark.parametrize("case", list(ALLOWED))
def test_fixed_shape_calls_run_inside(case: str, mode: contextlib.AbstractContextManager) -> None:
    with mode:
        outside = ALLOWED[case]()
        inside = check_no_host_reads(ALLOWED[case])
    assert type(inside) is type(outside)


def test_a_pure_tensor_step_runs_inside(mode: contextlib.AbstractContextManager) -> None:
    h, w, table = torch.randn(3, 8), torch.randn(8, 5), torch.randn(5, 8)
    with mode:
        want = pure_step(h, w, table)
        got = check_no_host_reads(pure_step, h, w, table)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
