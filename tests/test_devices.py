"""Device handling without a GPU: the meta device stands in for "another device". Mixed devices
are rejected with the argument named; all-meta inputs propagate shapes through the fake kernels."""

from __future__ import annotations

import pytest
import torch

import nats_kernels as nk

META = torch.device("meta")


def _cpu(*shape):
    return torch.ones(shape)


def _meta(*shape):
    return torch.ones(shape, device=META)


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: nk.cfg_accumulate(_cpu(4, 3), _cpu(2, 4, 3), _meta(2)), "weights"),
        (lambda: nk.cfg_accumulate(_cpu(4, 3), _meta(2, 4, 3), _cpu(2)), "grads"),
        (lambda: nk.cfg_accumulate(_cpu(4, 3), [_cpu(4, 3), _meta(4, 3)], _cpu(2)), r"grads\[1\]"),
        (lambda: nk.cfg_accumulate(_cpu(4, 3), _cpu(2, 4, 3), _cpu(2), scale=_meta(2, 4)),
         "scale"),
        (lambda: nk.cfg_accumulate(_cpu(4, 3), _cpu(2, 4, 3), _cpu(2), eta=_meta()), "eta"),
        (lambda: nk.cfg_accumulate(_cpu(4, 3), _cpu(2, 4, 3), _cpu(2), out=_meta(4, 3)), "out"),
        (lambda: nk.cfg_step_(_cpu(4, 3), _meta(4, 3), 1.0), "grad"),
        (lambda: nk.cfg_step_(_cpu(4, 3), _cpu(4, 3), _meta()), "weight"),
        (lambda: nk.cfg_step_(_cpu(4, 3), _cpu(4, 3), 1.0, eta=_meta()), "eta"),
        (lambda: nk.cfg_step_(_cpu(4, 3), _cpu(4, 3), 1.0, scale=_meta(4)), "scale"),
        (lambda: nk.median_pairwise_distance(_cpu(5, 2), _meta(3, 2)), "y"),
        (lambda: nk.multi_dot([_cpu(3)], [_meta(3)]), r"b\[0\]"),
        (lambda: nk.multi_dot([_cpu(3), _meta(2)], [_cpu(3), _cpu(2)]), r"a\[1\]"),
        (lambda: nk.aw_weights(_cpu(3), _meta(4), _cpu(4)), "real_logits"),
        (lambda: nk.aw_weights(_cpu(3), _cpu(4), _meta(4)), "fake_logits"),
        (lambda: nk.aw_combine_([_cpu(3)], [_cpu(3)], [_meta(3)], 1.0, 1.0), r"g_f\[0\]"),
        (lambda: nk.aw_combine_([_cpu(3)], [_cpu(3)], [_cpu(3)], _meta(), 1.0), "w_r"),
        (lambda: nk.iga_ratio([_cpu(3)], [_meta(3)]), r"gF_D\[0\]"),
        (lambda: nk.iga_correction_([_cpu(3)], [_cpu(3)], _meta()), "r"),
    ],
)
def test_mixed_devices_name_the_argument(call, name):
    with pytest.raises(ValueError, match=f"{name} is on meta, expected cpu"):
        call()


def test_meta_tensors_propagate_shapes():
    out = nk.cfg_accumulate(_meta(4, 3), _meta(2, 4, 3), _meta(2), scale=_meta(2, 4))
    assert out.shape == (4, 3) and out.device == META
    assert nk.cfg_step_(_meta(4, 3), _meta(4, 3), 0.5).shape == (4, 3)
    assert nk.annealed_weights(1.0, 0.1, 6, device=META).shape == (6,)
    assert nk.median_pairwise_distance(_meta(9, 2)).shape == ()
    assert nk.median_pairwise_distance(_meta(3, 9, 2), batched=True).shape == (3,)
    assert nk.multi_dot([_meta(3)], [_meta(3)]).shape == (3,)
    w_r, w_f, case = nk.aw_weights(_meta(3), _meta(4), _meta(4))
    assert w_r.shape == w_f.shape == case.shape == () and case.dtype == torch.int64
    assert nk.iga_ratio([_meta(3)], [_meta(3)]).shape == ()
