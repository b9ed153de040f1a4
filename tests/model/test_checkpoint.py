"""load_folded: values that overflow the requested dtype, and the weights file's format version."""

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import camex_runtime as cr

NAME = "transformer.h.0.ffn.experts.fc1.weight"


def _rewrite(src, dst, edit=lambda t: None, metadata=None):
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={**meta, **(metadata or {})})
    return dst


def test_values_beyond_the_target_dtype_are_refused_after_the_cast(tiny_lm_dir, tmp_path):
    def huge(t):
        t[NAME] = t[NAME].clone()
        t[NAME][0, 0, 0] = 1e6  # finite in fp32 and bf16, inf in fp16 (max 65504)
    ckpt = _rewrite(tiny_lm_dir, tmp_path / "huge", huge)
    with pytest.raises(cr.CheckpointError,
                       match=rf"'{NAME}' has values outside the range of torch.float16"):
        cr.load_folded(ckpt, dtype=torch.float16)
    assert cr.load_folded(ckpt, dtype=torch.bfloat16).state_dict[NAME].dtype == torch.bfloat16
    assert cr.load_folded(ckpt).state_dict[NAME][0, 0, 0] == 1e6


def test_weights_format_version_is_compared_when_stored(tiny_lm_dir, tmp_path):
    with safe_open(str(tiny_lm_dir / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["camex_format_version"] == "1"
    ckpt = _rewrite(tiny_lm_dir, tmp_path / "v99", metadata={"camex_format_version": "99"})
    with pytest.raises(cr.CheckpointError, match="camex_format_version '99'"):
        cr.load_folded(ckpt)


def test_a_device_this_machine_lacks_is_named_before_the_file_is_read(tiny_lm_dir):
    # (torch.device("cuda") itself is accepted by a CPU-only build; the first tensor moved
    # there failed, and the loader reported an "unreadable safetensors file")
    from camex_runtime.devices import check_device

    if torch.cuda.is_available():  # a GPU machine: a device index beyond the visible ones
        missing, why = [f"cuda:{torch.cuda.device_count()}"], r"only \d+ CUDA device\(s\) visible"
    else:
        missing, why = ["cuda", "cuda:1", torch.device("cuda", 0)], r"no CUDA .*use the cpu device"
    for device in missing:
        with pytest.raises(ValueError, match=why) as err:
            cr.load_folded(tiny_lm_dir, device=device)
        assert not isinstance(err.value, cr.CheckpointError)
    with pytest.raises(ValueError, match="'gpu' is not a torch device"):
        check_device("gpu")
    assert check_device("cpu") == torch.device("cpu")
    assert cr.load_folded(tiny_lm_dir, device="cpu").config.folded
