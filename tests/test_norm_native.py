"""SSRNorm's compiled CPU kernel (lightning_ssr.norm.native, .build, kernel.cpp): the same arithmetic
as the Python path, chosen where it applies, refused with a clear error where it cannot run, and
built on demand or ahead (or not, with the reason)."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lightning_ssr.norm import SSRNorm1d, SSRNorm2d, SSRNorm3d, convert_batchnorm
from lightning_ssr.norm.native import KernelUnavailableError, load_kernel

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kernel():
    """The kernel, built if needed; skipped only where no C++ compiler exists (a failed build fails)."""
    if not any(shutil.which(c) for c in (os.environ.get("CXX") or "c++", "g++", "clang++")):
        pytest.skip("no C++ compiler: SSRNorm runs its Python path")
    return load_kernel()


def _pair(cls, channels: int, **kwargs):
    eager, fused = cls(channels, kernel="eager", **kwargs), cls(channels, kernel="native", **kwargs)
    if eager.weight is not None:
        with torch.no_grad():
            eager.weight.uniform_(0.5, 1.5)
            fused.weight.copy_(eager.weight)
            if eager.bias is not None:
                eager.bias.normal_()
                fused.bias.copy_(eager.bias)
    return eager, fused


CONFIGS = [
    (SSRNorm2d, (4, 8, 5, 5), {}),
    (SSRNorm2d, (1, 8, 3, 3), {}),
    (SSRNorm1d, (16, 10), {}),
    (SSRNorm1d, (4, 10, 7), {}),
    (SSRNorm3d, (2, 4, 3, 3, 3), {}),
    (SSRNorm2d, (4, 8, 5, 5), {"affine": False}),
    (SSRNorm2d, (4, 8, 5, 5), {"bias": False}),
    (SSRNorm2d, (4, 8, 5, 5), {"set_point": "layer_mean", "gain_rate": 0.5, "max_change": 0.2}),
    (SSRNorm2d, (4, 8, 5, 5), {"momentum": None}),
    (SSRNorm2d, (4, 8, 5, 5), {"project_gradient": False}),
    (SSRNorm2d, (4, 8, 5, 5), {"gain_rate": 0.0}),
]


@pytest.mark.parametrize("cls,shape,kwargs", CONFIGS)
def test_kernel_computes_what_the_python_path_computes(kernel, cls, shape, kwargs) -> None:
    eager, fused = _pair(cls, shape[1], **kwargs)
    torch.manual_seed(0)
    for t in range(12):  # the input's scale grows, so the gain and the projection both move
        x = (torch.randn(*shape) * (1 + 0.1 * t) + 0.5).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        grad = torch.randn(*shape)
        y, y2 = eager(x), fused(x2)
        y.backward(grad)
        y2.backward(grad)
        assert y2.grad_fn.name() == ("_StateNormBackward" if t == 0 else  # the warm start runs in Python
                                     "torch::autograd::CppNode<(anonymous namespace)::SSRNormFunction>")
        assert_close(y2, y, rtol=1e-5, atol=1e-5)
        assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
        if eager.weight is not None:
            assert_close(fused.weight.grad, eager.weight.grad, rtol=1e-4, atol=1e-4)
        if eager.bias is not None:
            assert_close(fused.bias.grad, eager.bias.grad, rtol=1e-4, atol=1e-4)
    for name, value in eager.state_dict().items():
        assert_close(fused.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert int(fused.num_batches_tracked) == 12
    if eager._grad_stats is not None:  # the running gradient moments of the projection
        assert_close(fused._grad_stats, eager._grad_stats, rtol=1e-4, atol=1e-5)
        assert int(fused._grad_steps_t) == eager._grad_steps == 12  # the warm start projects too


@pytest.mark.parametrize("mode", ["driven", "reduced"])
def test_kernel_accumulates_where_the_state_is_updated_later(kernel, mode: str) -> None:
    """auto_update=False (a driver calls homeostatic_step, as SynapticScaling(drive_norm_layers=True)
    does) and statistics reduced across processes (here by an identity reduce_fn) run in the kernel
    too: it adds to the pending sums, and the layer's homeostatic_step applies them."""
    kwargs = {"auto_update": False} if mode == "driven" else {}
    eager, fused = _pair(SSRNorm2d, 5, **kwargs)
    if mode == "reduced":
        calls = []
        for m in (eager, fused):
            m.reduce_fn = lambda flat, calls=calls: calls.append(flat.clone()) or flat
    nodes = set()
    for t in range(9):
        x = (torch.randn(3, 5, 4, 4) * (1 + 0.2 * t) - 1).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        grad = torch.randn(3, 5, 4, 4)
        y, y2 = eager(x), fused(x2)
        nodes.add(y2.grad_fn.name())
        y.backward(grad)
        y2.backward(grad)
        if mode == "driven" and t % 2:  # two forwards per update
            assert eager.homeostatic_step() and fused.homeostatic_step()
        assert_close(y2, y, rtol=1e-5, atol=1e-5)
        assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
    assert "torch::autograd::CppNode<(anonymous namespace)::SSRNormFunction>" in nodes
    for name, value in eager.state_dict().items():
        assert_close(fused.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert int(fused.num_batches_tracked) == (4 if mode == "driven" else 9)
    if mode == "reduced":
        assert len(calls) == 18  # one reduction per forward and layer
        assert_close(calls[-1], calls[-2], rtol=1e-5, atol=1e-4)  # the same flat statistics from both paths


def test_kernel_without_input_gradient_and_without_autograd(kernel) -> None:
    eager, fused = _pair(SSRNorm2d, 3)
    for t in range(4):  # the first layer of a network: gradients for the weight and bias only
        x = torch.randn(2, 3, 4, 4) + t
        eager(x).sum().backward()
        fused(x).sum().backward()
    assert_close(fused.weight.grad, eager.weight.grad, rtol=1e-4, atol=1e-4)
    assert eager._grad_stats is None and int(fused._grad_steps_t) == 0  # no projection without an input gradient
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 3, 4, 4)
            assert_close(fused(x), eager(x))
    for name, value in eager.state_dict().items():
        assert_close(fused.state_dict()[name], value, msg=name)


def test_paths_can_alternate_and_share_the_gradient_moments(kernel) -> None:
    reference, mixed = _pair(SSRNorm2d, 4)
    for t in range(8):
        mixed.kernel = "native" if t % 3 else "eager"
        x = torch.randn(3, 4, 2, 2).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        reference(x).pow(2).sum().backward()
        mixed(x2).pow(2).sum().backward()
        assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
    assert_close(mixed._grad_stats, reference._grad_stats, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["auto", "eager"])
def test_converted_resnet18_train_and_eval_agree_at_batch_1(path: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = convert_batchnorm(torchvision.models.resnet18(num_classes=10), kernel=path)
    model.train()
    for _ in range(3):  # warm start, then two updates through the chosen path
        model(torch.randn(1, 3, 32, 32))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    nodes = []
    hook = model.bn1.register_forward_hook(lambda m, i, out: nodes.append(out.grad_fn.name()))
    y_train = model.train()(x)
    hook.remove()
    model.load_state_dict(state)
    with torch.no_grad():
        y_eval = model.eval()(x)
    assert_close(y_train, y_eval, rtol=1e-5, atol=1e-5)
    ran = "torch::autograd::CppNode<(anonymous namespace)::SSRNormFunction>"
    if path == "auto" and shutil.which("c++"):
        assert nodes == [ran]  # "auto" ran the kernel
    elif path == "eager":
        assert nodes == ["_StateNormBackward"]


def test_native_refuses_what_it_cannot_run_and_auto_falls_back(kernel) -> None:
    for bad, reason in [
        (lambda: SSRNorm1d(3, kernel="native", dtype=torch.float64), "float32 on the CPU"),
        (lambda: SSRNorm1d(3, kernel="native", activity="abs"), "activity='square'"),
        (lambda: SSRNorm1d(3, kernel="native", track_running_stats=False), "track_running_stats=True"),
    ]:
        m = bad()
        x = torch.randn(4, 3, dtype=m.gain.dtype)
        m(x)  # the warm start runs in Python
        with pytest.raises(ValueError, match=r"SSRNorm1d\(kernel='native'\): .*" + reason.replace("(", r"\(")):
            m(x)
    m = SSRNorm2d(3, kernel="native")
    m(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="contiguous layout"):
        m(torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last))
    auto = SSRNorm2d(3)  # the same inputs in "auto" run in Python, without a word
    auto(torch.randn(2, 3, 4, 4))
    auto(torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last))
    assert int(auto.num_batches_tracked) == 2


def test_kernel_argument_is_checked_and_shown() -> None:
    with pytest.raises(ValueError, match=r"`kernel` must be one of \['auto', 'native', 'eager'\], got 'fast'"):
        SSRNorm2d(4, kernel="fast")
    assert "kernel='eager'" in repr(SSRNorm2d(4, kernel="eager"))
    with pytest.raises(TypeError, match="Unexpected keyword"):
        convert_batchnorm(nn.BatchNorm2d(4), kernels="eager")
    assert convert_batchnorm(nn.BatchNorm2d(4), kernel="eager").kernel == "eager"


def test_layers_pickled_before_the_kernel_load_as_auto() -> None:
    m = SSRNorm2d(4)
    state = m.__dict__.copy()
    del state["kernel"], state["_grad_steps_t"]  # what an older version pickled
    old = SSRNorm2d.__new__(SSRNorm2d)
    old.__setstate__(state)
    assert old.kernel == "auto" and old._grad_steps_t is None
    assert pickle.loads(pickle.dumps(m)).kernel == "auto"
    old(torch.randn(2, 4, 3, 3))


def _python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "LIGHTNING_SSR_KERNEL_DIR": str(tmp_path / "kernels"), **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=600)


def test_without_a_compiler_native_says_why_and_auto_warns_once(tmp_path: Path) -> None:
    code = """
import warnings, torch
from lightning_ssr.norm import SSRNorm2d
from lightning_ssr.norm.native import KernelUnavailableError
try:
    SSRNorm2d(4, kernel="native")
except KernelUnavailableError as err:
    print("native:", err)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    layers = [SSRNorm2d(4), SSRNorm2d(4)]
    for _ in range(3):
        for m in layers:
            m(torch.randn(2, 4, 3, 3)).sum().backward()
print("warnings:", len(caught), caught[0].category.__name__, caught[0].message)
print("trained:", [int(m.num_batches_tracked) for m in layers])
"""
    out = _python(code, tmp_path, CXX="/nonexistent/c++")
    assert out.returncode == 0, out.stderr
    assert "native: `kernel='native'` needs SSRNorm's compiled CPU kernel, which is not available: " \
           "the compiler $CXX='/nonexistent/c++' was not found" in out.stdout
    assert "warnings: 1 RuntimeWarning SSRNorm's native CPU kernel is not available" in out.stdout
    assert "trained: [3, 3]" in out.stdout
    failed = _python(code, tmp_path, CXX="false")  # a compiler that fails
    assert "compiling kernel.cpp with false failed (exit 1)" in failed.stdout, failed.stdout + failed.stderr
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    unwritable = _python(code, tmp_path, LIGHTNING_SSR_KERNEL_DIR=str(blocked / "kernels"))
    assert f"cannot write the build into {blocked / 'kernels'}" in unwritable.stdout, unwritable.stderr
    assert "trained: [3, 3]" in unwritable.stdout
    build = subprocess.run([sys.executable, "-m", "lightning_ssr.norm.build"], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "LIGHTNING_SSR_KERNEL_DIR": str(tmp_path), "CXX": "/nonexistent/c++"})
    assert build.returncode == 1
    assert "native kernel is not available: the compiler $CXX='/nonexistent/c++' was not found" in build.stderr


def test_build_ahead_into_a_fresh_directory_and_load_it(kernel, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "lightning_ssr.norm.build"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "LIGHTNING_SSR_KERNEL_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    built = Path(out.stdout.strip())
    assert built.parent == tmp_path and built.is_file() and "compiling SSRNorm's CPU kernel once" in out.stderr
    assert "Warning" not in out.stderr, out.stderr
    again = _python("from lightning_ssr.norm.native import load_kernel; print(load_kernel(build=False).__file__)",
                    tmp_path, LIGHTNING_SSR_KERNEL_DIR=str(tmp_path))
    assert again.stdout.strip() == str(built) and "compiling" not in again.stderr
    missing = _python("from lightning_ssr.norm.native import load_kernel; load_kernel(build=False)", tmp_path)
    assert isinstance(KernelUnavailableError("x"), RuntimeError)
    assert "no build at" in missing.stderr and "python -m lightning_ssr.norm.build" in missing.stderr
