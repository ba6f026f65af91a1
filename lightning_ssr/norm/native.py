"""SSRNorm's fused CPU kernel: compiled once per environment from ``kernel.cpp``, loaded on demand.

The Python path of the SSR layers runs about 40 small per-channel tensor operations per training
call, which at small batches cost more than BatchNorm's whole forward and backward. The kernel does
the same arithmetic in one pass over the input forward and two backward (float32, contiguous, on
the CPU). It is compiled with the C++ compiler (``$CXX``, else ``c++`` or ``g++``) against the
installed torch the first time it is needed, about 30 s, into :func:`kernel_dir`; later processes
load the cached build. ``make setup`` builds it ahead (``python -m lightning_ssr.norm.build``).

Examples::

    >>> kernel_path().suffix
    '.so'
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from importlib.machinery import ExtensionFileLoader
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_ssr.norm.base import _SSRNorm

__all__ = [
    "KernelUnavailableError", "blocker", "build_kernel", "kernel_dir", "kernel_for", "kernel_path", "load_kernel",
    "train_forward", "warn_unavailable",
]

_SOURCE = Path(__file__).with_name("kernel.cpp")
_MODULE = "_ssr_norm_kernel"
_log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: Optional[ModuleType] = None
_failure: Optional[str] = None
_warned = False


class KernelUnavailableError(RuntimeError):
    """The native kernel could not be built or loaded; the message says why."""


def kernel_dir() -> Path:
    """Where builds are cached: ``$LIGHTNING_SSR_KERNEL_DIR``, else ``lightning_ssr`` in torch's
    directory for extensions built on demand (``$TORCH_EXTENSIONS_DIR``, else
    ``torch_extensions`` in ``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    env = os.environ.get("LIGHTNING_SSR_KERNEL_DIR")
    if env:
        return Path(env).expanduser()
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions")
    return Path(root).expanduser() / "lightning_ssr"


def _abi_flags() -> list[str]:
    """The ABI flags torch itself was built with (as ``torch.utils.cpp_extension`` passes them)."""
    flags = [f"-D_GLIBCXX_USE_CXX11_ABI={int(getattr(torch._C, '_GLIBCXX_USE_CXX11_ABI', True))}"]
    for name in ("COMPILER_TYPE", "STDLIB", "BUILD_ABI"):
        value = getattr(torch._C, f"_PYBIND11_{name}", None)
        if value is not None:
            flags.append(f'-DPYBIND11_{name}="{value}"')
    return flags


def _command(compiler: str, output: Path) -> list[str]:
    root = Path(torch.__file__).parent
    include = root / "include"
    return [
        compiler, "-O3", "-std=c++20", "-fPIC", "-shared", "-fopenmp", f"-DTORCH_EXTENSION_NAME={_MODULE}",
        "-DTORCH_API_INCLUDE_EXTENSION_H", *_abi_flags(),
        "-isystem", str(include), "-isystem", str(include / "torch" / "csrc" / "api" / "include"),
        "-isystem", sysconfig.get_paths()["include"],
        str(_SOURCE), "-o", str(output),
        f"-L{root / 'lib'}", "-ltorch_python", "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{root / 'lib'}",
    ]


def kernel_path() -> Path:
    """The cached build for this source, torch and Python (it may not exist yet)."""
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(f"{torch.__version__}|{sys.version}|{' '.join(_command('', Path()))}".encode())
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return kernel_dir() / f"{_MODULE}-{key.hexdigest()[:16]}{suffix}"


def _compiler() -> str:
    """``$CXX`` if set (it must exist), else the first of ``c++``, ``g++`` and ``clang++`` found."""
    env = os.environ.get("CXX")
    if env:
        if shutil.which(env):
            return env
        raise KernelUnavailableError(f"the compiler $CXX={env!r} was not found")
    for candidate in ("c++", "g++", "clang++"):
        if shutil.which(candidate):
            return candidate
    raise KernelUnavailableError("no C++ compiler found (set $CXX, or install g++)")


def build_kernel(force: bool = False) -> Path:
    """Compile the kernel into :func:`kernel_path` unless a build is already there.

    Processes that build at the same time wait for each other (a lock file next to the build), and
    a build appears under its final name only once complete.

    Args:
        force: compile again even if a build exists.

    Returns:
        The path of the build.

    Raises:
        KernelUnavailableError: no compiler, the build directory cannot be written, or the
            compilation failed (the message ends with the compiler's last output).
    """
    path = kernel_path()
    if path.exists() and not force:
        return path
    try:
        return _build(path, force)
    except OSError as err:
        raise KernelUnavailableError(
            f"cannot write the build into {path.parent} ({err}); set $LIGHTNING_SSR_KERNEL_DIR to a writable "
            "directory") from err


def _build(path: Path, force: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no lock between processes
            pass
        if path.exists() and not force:
            return path
        compiler = _compiler()
        _log.warning("lightning_ssr: compiling SSRNorm's CPU kernel once (about 30 s) into %s", path)
        fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent)
        os.close(fd)
        try:
            done = subprocess.run(_command(compiler, Path(tmp)), capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
                raise KernelUnavailableError(
                    f"compiling {_SOURCE.name} with {compiler} failed (exit {done.returncode}): " + " | ".join(tail))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def load_kernel(build: bool = True) -> ModuleType:
    """The kernel module, loaded once per process (built first when ``build`` and not cached).

    A failure is remembered, so that a process tries to build at most once.

    Raises:
        KernelUnavailableError: it could not be built or loaded, or ``build=False`` and no build
            is cached.
    """
    global _loaded, _failure
    with _lock:
        if _loaded is not None:
            return _loaded
        if _failure is not None:
            raise KernelUnavailableError(_failure)
        path = kernel_path()
        try:
            if build:
                build_kernel()
            if not path.exists():
                raise KernelUnavailableError(f"no build at {path} (run `python -m lightning_ssr.norm.build`)")
            spec = spec_from_file_location(_MODULE, path, loader=ExtensionFileLoader(_MODULE, str(path)))
            assert spec is not None and spec.loader is not None
            module = module_from_spec(spec)
            spec.loader.exec_module(module)
        except KernelUnavailableError as err:
            if build:
                _failure = str(err)
            raise
        except (OSError, ImportError) as err:
            _failure = f"loading {path} failed: {err}"
            raise KernelUnavailableError(_failure) from err
        _loaded = module
        return module


def warn_unavailable(err: Exception) -> None:
    """Warn, once per process, that the layers run in the Python path because of ``err``."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"SSRNorm's native CPU kernel is not available ({err}); the SSR layers use the Python path: "
            "the same results, slower at small batches. Pass kernel='eager' to the layers to choose it "
            "and silence this warning.", RuntimeWarning, stacklevel=3)


def kernel_for(layer: _SSRNorm, input: Tensor) -> Optional[ModuleType]:
    """The kernel module for this training call of ``layer``, or ``None`` for the Python path.

    The first training batch (the warm start) always runs in Python. ``kernel="native"`` raises
    where the kernel cannot run; ``"auto"`` falls back, with one warning per process if the
    kernel cannot be built.
    """
    if not layer._initialized_seen and not layer._is_initialized():
        return None
    reason = blocker(layer, input)
    if reason is not None:
        if layer.kernel == "native":
            raise ValueError(f"{type(layer).__name__}(kernel='native'): {reason}; use kernel='auto' or 'eager'")
        return None
    if _loaded is not None:
        return _loaded
    try:
        return load_kernel()
    except KernelUnavailableError as err:
        if layer.kernel == "native":
            raise
        warn_unavailable(err)
        return None


def blocker(layer: _SSRNorm, input: Tensor) -> Optional[str]:
    """Why this training call of ``layer`` cannot run in the kernel, or ``None`` when it can."""
    rm = layer._buffers["running_mean"]
    if rm is None:
        return "the kernel needs track_running_stats=True"
    if input.dtype is not torch.float32 or rm.dtype is not torch.float32 or not (input.is_cpu and rm.is_cpu):
        return (f"the kernel takes float32 on the CPU (input {input.dtype} on {input.device}, "
                f"state {rm.dtype} on {rm.device})")
    if not input.is_contiguous():
        return "the kernel takes input in torch's contiguous layout"
    if not layer._phi_is_square:
        return "the kernel senses activity='square' only"
    return None


def train_forward(kernel: ModuleType, layer: _SSRNorm, input: Tensor) -> Tensor:
    """One training forward of ``layer`` in the kernel: the Python path's arithmetic (normalize
    with the state, one state update, the projected backward), sharing the running gradient
    moments with it; the kernel counts its projections in a one-element tensor.

    As in the Python path, the state is updated in the forward only with ``auto_update=True``,
    nothing pending and no reduction across processes; otherwise the kernel adds the batch's
    statistics to the pending sums, and with ``auto_update=True`` the layer's
    :meth:`~lightning_ssr.norm.base._SSRNorm.homeostatic_step` (with its one collective) applies
    them at once.

    The layer's ``_steps_seen`` may go stale here; the Python path reads the buffer again while
    the count is at most ``tau`` and uses the weight ``1 / tau`` after that, whatever the count.
    """
    gs, steps = layer._grad_stats, layer._grad_steps_t
    c = layer.num_features
    if steps is None or gs is None or gs.shape[1] != c or not gs.is_cpu:
        if gs is None or gs.shape != (4, c) or gs.dtype != torch.float32 or not gs.is_cpu:
            layer._grad_stats = gs = torch.zeros(4, c)
            layer._grad_steps = 0
        layer._grad_steps_t = steps = torch.tensor([layer._grad_steps], dtype=torch.long)
    accumulate = not layer._updates_in_forward()
    pending = gs
    if accumulate:
        if layer._sums is None or layer._count == 0:
            layer._sums = torch.zeros(3 * c)
        pending = layer._sums
    sp = layer.set_point
    layer_mean = isinstance(sp, str)
    params = [layer.eps, layer.tau, layer.gain_rate, layer.max_change, layer.max_gain, 0.0 if layer_mean else sp,
              layer.grad_momentum, float(layer_mean), float(layer.project_gradient), float(accumulate)]
    # The dictionaries nn.Module keeps them in: a plain lookup, where attribute access through
    # nn.Module.__getattr__ costs about 1 us each, a fifth of the kernel's own time at batch 1.
    p, b = layer._parameters, layer._buffers
    output = kernel.train_forward(input, p["weight"], p["bias"], b["running_mean"], b["running_var"],
                                  b["running_activity"], b["gain"], b["num_batches_tracked"], gs, steps, pending,
                                  params)
    if accumulate:
        layer._count += float(input.numel() // c)
        if layer.auto_update:
            layer.homeostatic_step()
    return output
