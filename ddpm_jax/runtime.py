"""Process settings that make XLA:CPU faster and leaner; the CLIs and benchmarks apply them at start.

Measured on a 2-core AVX-512 machine with the article's U-Net at batch 128
(README, Benchmarks):

* Huge pages for the allocator. XLA:CPU allocates a training step's
  temporaries (about 380 MB at batch 128) afresh at every step; glibc serves a
  block that large from a new mmap, so each step faults in ~93,000 4-KiB pages:
  ~150 ms of kernel time per 380-ms step. glibc's tunable
  `glibc.malloc.hugetlb=1` (glibc >= 2.35) has malloc ask for transparent huge
  pages, which cuts the faults 180-fold: steps run ~25 % faster, and peak memory
  is no higher. glibc reads tunables only when a process starts, so the CLIs
  start themselves once more with it set (`configure(reexec=True)`) -- only when
  the process will compute on the CPU (`expects_cpu_backend`: decided from
  JAX_PLATFORMS and the installed accelerator plugins, without starting a
  backend) and the tunable is not set yet. A GPU or TPU process is not restarted.
* XLA flags, on the CPU backend only. jaxlib 0.10 routes convolutions through
  YNNPACK by default; its kernels for this network's narrow convolutions
  (10-80 channels) are slower than XLA's Eigen ones, so the CPU defaults turn
  that one routing off. And XLA packs a step's temporaries into one block
  (235 MB for the article's U-Net at batch 128), which malloc maps afresh and
  the kernel zeroes at every step even in huge pages (13 % of the CPU's time);
  `--xla_multiheap_size_constraint_per_heap` splits them into blocks of about
  8 MiB, which glibc keeps in its heap and hands back the next step: training
  +15 % (article U-Net) and +18 % (`unet`), sampling unchanged (its loop
  allocates once), ~100-250 MB more resident memory. A flag the user already
  put in XLA_FLAGS wins.
* `release_free_host_memory()` hands freed heap pages back to the OS; training
  calls it after compiling, before the first step allocates its own memory.

Neither setting changes what is computed, only how memory is obtained and which
kernel evaluates a convolution (tests/test_runtime.py checks outputs and
gradients agree to float rounding). DDPM_JAX_CPU_TUNING=off leaves the process
as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

# Flags measured to help this project's models on XLA:CPU, and the jaxlib versions measured.
# XLA aborts at start on a flag it does not know, so they are set on those versions only.
XLA_CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": "-individual_convolution",
                 "--xla_multiheap_size_constraint_per_heap": str(8 << 20)}
XLA_CPU_FLAGS_JAXLIB = ((0, 10), (0, 11))  # [from, to)

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def switched_on(variable: str, environ=os.environ) -> bool:
    """An on-by-default switch in the environment: off only when set to off, 0, false or no."""
    return environ.get(variable, "on").lower() not in ("off", "0", "false", "no")


def tuning_enabled(environ=os.environ) -> bool:
    return switched_on("DDPM_JAX_CPU_TUNING", environ)


def xla_flags_with_cpu_defaults(xla_flags: str, jaxlib_version: str) -> str:
    """`xla_flags` (an XLA_FLAGS string) plus those of XLA_CPU_FLAGS it does not set itself,
    on the jaxlib versions they were measured on; unchanged on others."""
    version = tuple(int(part) for part in jaxlib_version.split(".")[:2])
    if not XLA_CPU_FLAGS_JAXLIB[0] <= version < XLA_CPU_FLAGS_JAXLIB[1]:
        return xla_flags
    given = {flag.split("=")[0] for flag in xla_flags.split()}
    extra = [f"{name}={value}" for name, value in XLA_CPU_FLAGS.items() if name not in given]
    return " ".join([xla_flags.strip(), *extra]).strip()


def tunables_with_huge_pages(tunables: str) -> str:
    """A GLIBC_TUNABLES string with malloc's huge pages on, unless it sets hugetlb itself."""
    if "glibc.malloc.hugetlb=" in tunables:
        return tunables
    return f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE


def _on_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _huge_pages_available() -> bool:
    """glibc >= 2.35 (it has the tunable) and transparent huge pages not switched off."""
    if not _on_glibc():
        return False
    version = platform.libc_ver()[1]
    try:
        if tuple(int(part) for part in version.split(".")[:2]) < (2, 35):
            return False
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except (OSError, ValueError):
        return False


# Distributions whose presence means JAX may pick an accelerator, and the device files that say
# one is there (jax falls back to the CPU without them).
_ACCELERATOR_DEVICE_FILES = {
    "cuda": ("/dev/nvidiactl", "/dev/nvidia0"),
    "rocm": ("/dev/kfd",),
    "tpu": ("/dev/accel0", "/dev/vfio/0"),
}


def _installed_accelerator_plugins() -> set[str]:
    """Kinds ('cuda', 'rocm', 'tpu') of the installed JAX accelerator plugins, found where JAX looks
    for them (the `jax_plugins` entry points and namespace package) and in the installed
    distributions (libtpu); imports no plugin."""
    import importlib.util
    import pkgutil
    from importlib import metadata

    names = set()
    try:
        names |= {f"{ep.name} {ep.value}".lower() for ep in metadata.entry_points(group="jax_plugins")}
    except Exception:  # broken metadata: look at the rest
        pass
    try:
        spec = importlib.util.find_spec("jax_plugins")
        if spec is not None and spec.submodule_search_locations:
            names |= {f"xla {m.name}".lower() for m in pkgutil.iter_modules(spec.submodule_search_locations)}
    except (ImportError, ValueError):
        pass
    try:
        names |= {(dist.metadata["Name"] or "").lower().replace("_", "-") for dist in metadata.distributions()}
    except Exception:
        pass
    kinds = set()
    for name in names:  # e.g. jax-cuda12-plugin (entry point xla_cuda12), jax-rocm7-plugin, libtpu
        for kind in ("cuda", "rocm", "tpu"):
            if kind in name and ("jax" in name or "xla" in name or name.startswith("lib" + kind)):
                kinds.add(kind)
    return kinds


def expects_cpu_backend(environ=os.environ, plugins=None, exists=None) -> bool:
    """Whether JAX will compute on the CPU here, decided without starting a backend.

    JAX_PLATFORMS decides when set (its first entry is JAX's choice); otherwise JAX picks
    an accelerator when a plugin for it is installed (jax-cuda*-plugin, jax-rocm*-plugin,
    libtpu) and its device files exist, and the CPU otherwise. `plugins` (a set of
    kinds) and `exists` replace the installed plugins and os.path.exists in tests.
    """
    platforms = [p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    plugins = _installed_accelerator_plugins() if plugins is None else plugins
    exists = os.path.exists if exists is None else exists
    return not any(exists(path) for kind in plugins for path in _ACCELERATOR_DEVICE_FILES.get(kind, ()))


def configure(reexec: bool = False, environ=os.environ) -> None:
    """Applies the settings above to this process if it will compute on the CPU
    (`expects_cpu_backend`); call it before JAX's first computation.

    reexec=True (the CLIs' entry points only): if the allocator's tunable is not in effect
    yet, restart this same command line with it set; returns only when no restart is needed.
    """
    if not tuning_enabled(environ):
        return
    import jaxlib

    if not expects_cpu_backend(environ):
        return
    environ["XLA_FLAGS"] = xla_flags_with_cpu_defaults(environ.get("XLA_FLAGS", ""), jaxlib.__version__)
    tunables = environ.get("GLIBC_TUNABLES", "")
    if reexec and sys.executable and tunables_with_huge_pages(tunables) != tunables and _huge_pages_available():
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
                      {**environ, "GLIBC_TUNABLES": tunables_with_huge_pages(tunables)})
        except OSError:  # cannot restart (an unusual interpreter): go on without the tunable
            pass


def release_free_host_memory() -> None:
    """Returns the heap's free pages to the OS (glibc's malloc_trim), e.g. what the compiler
    used. Cheap; a no-op off glibc."""
    if _on_glibc():
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, so a second run starts in seconds.

    On by default under ~/.cache/ddpm_jax/xla; DDPM_JAX_COMPILE_CACHE=DIR moves it,
    DDPM_JAX_COMPILE_CACHE=off turns it off.
    """
    import jax

    where = os.environ.get("DDPM_JAX_COMPILE_CACHE", os.path.join("~", ".cache", "ddpm_jax", "xla"))
    if where.lower() in ("off", "0", "none", ""):
        return
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(where)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
