"""A machine with a GPU but no calibra._cuda (a plain `pip install .`): every op on CUDA tensors would run
in its pure-torch reference, so calibra warns once and `calibra info` names the missing backend. Simulated
here: torch.cuda.is_available() is patched to True and the CUDA backend's load is recorded as failed."""

import warnings

import pytest
import torch

import calibra
from calibra import _native
from calibra.ops import _cuda

NOT_BUILT = "ImportError: calibra._cuda is not built (build with CALIBRA_CUDA=1 pip install .)"


@pytest.fixture
def gpu_without_cuda_module(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_native, "_modules", {k: v for k, v in _native._modules.items() if k != "cuda"})
    monkeypatch.setattr(_native, "_reasons", {**_native._reasons, "cuda": NOT_BUILT})
    monkeypatch.setattr(_cuda, "_warned", False)


def test_warns_once_naming_the_missing_backend(gpu_without_cuda_module):
    with pytest.warns(RuntimeWarning) as record:
        assert _cuda.register() == []
        assert _cuda.register() == []
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "calibra._cuda" in messages[0] and "CALIBRA_CUDA=1 pip install ." in messages[0]
    assert "pure-torch reference" in messages[0]


def test_build_info_names_the_reason(gpu_without_cuda_module, capsys):
    entry = calibra.build_info()["backends"]["cuda"]
    assert not entry["loaded"]
    assert "calibra._cuda is not built" in entry["reason"] and "CALIBRA_CUDA=1 pip install ." in entry["reason"]
    assert "pure-torch reference" in entry["reason"]
    from calibra import cli

    assert cli.main(["info"]) == 0
    assert "cuda  not loaded: ImportError: calibra._cuda is not built" in capsys.readouterr().out


def test_no_warning_when_disabled_on_purpose(gpu_without_cuda_module, monkeypatch):
    monkeypatch.setitem(_native._reasons, "cuda", "ImportError: disabled by CALIBRA_DISABLE_NATIVE=cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _cuda.register() == []


def test_no_warning_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(_native, "_modules", {k: v for k, v in _native._modules.items() if k != "cuda"})
    monkeypatch.setattr(_cuda, "_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _cuda.register() == []
    assert calibra.build_info()["backends"]["cuda"]["reason"].startswith("torch sees no CUDA device")
