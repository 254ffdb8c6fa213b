"""Process settings the CLI chooses before jax starts: a caching allocator and XLA:CPU flags.

XLA:CPU allocates and frees its large buffers (the logits alone can be hundreds of MB) every
step; glibc malloc hands them back to the kernel and takes them again, which costs the
decoder_100m train step a third of its time in the kernel (experiments/benchmarks.md has the
measurements). tcmalloc keeps freed memory. An allocator (LD_PRELOAD) and glibc's settings
(GLIBC_TUNABLES) are read only when a process starts, so the CLI re-executes itself once.

`T5X_LITE_ALLOCATOR` chooses: unset or 'auto' (tcmalloc when found, else glibc with
transparent huge pages), 'tcmalloc', 'glibc' (huge pages: half the kernel time of the
default), 'system' (nothing changed), or the path of a shared library to preload. tcmalloc is
found where the system keeps it (Debian: apt-get install libtcmalloc-minimal4) or in the
virtualenv, where `run.sh` unpacks Debian's package when it can.

On CPU, XLA's YNNPACK fusions of elementwise ops and reductions (besides dots) and 512-bit
vectors on AVX-512 machines take 7-11% off the benchmark train steps (experiments/
benchmarks.md, "what we tried"); they are added to XLA_FLAGS unless it sets them already, or
`T5X_LITE_XLA_CPU_FLAGS=none`.
"""

import ctypes.util
import os
import pathlib
import sys

ENV = 'T5X_LITE_ALLOCATOR'
XLA_ENV = 'T5X_LITE_XLA_CPU_FLAGS'
LOADED = 'T5X_LITE_ALLOCATORLOADED'  # set in the re-executed process: never loop
_GLIBC_HUGE_PAGES = 'glibc.malloc.hugetlb=1'
CHOICES = ('auto', 'tcmalloc', 'glibc', 'system')


def find_tcmalloc() -> str | None:
  """The path or soname of tcmalloc: the virtualenv's copy, else the system's."""
  for local in sorted((pathlib.Path(sys.prefix) / 'lib' / 'tcmalloc').glob('libtcmalloc*.so*')):
    return str(local)
  return ctypes.util.find_library('tcmalloc_minimal') or ctypes.util.find_library('tcmalloc')


def environment(choice: str) -> dict[str, str]:
  """The variables that select `choice` in a new process ({} for the system allocator)."""
  if choice == 'system':
    return {}
  library = find_tcmalloc() if choice in ('auto', 'tcmalloc') else None
  name = 'tcmalloc'
  if choice not in CHOICES:
    if not pathlib.Path(choice).is_file():
      raise ValueError(f'{ENV}={choice}: no such library; use one of {", ".join(CHOICES)} '
                       'or the path of an allocator shared library')
    library = name = choice
  if library:
    preload = ' '.join(filter(None, (os.environ.get('LD_PRELOAD'), library)))
    return {'LD_PRELOAD': preload, LOADED: name}
  if choice == 'tcmalloc':
    print(f'warning: {ENV}=tcmalloc: not found (Debian: apt-get install '
          'libtcmalloc-minimal4); using glibc malloc with huge pages', file=sys.stderr)
  tunables = ':'.join(filter(None, (os.environ.get('GLIBC_TUNABLES'), _GLIBC_HUGE_PAGES)))
  return {'GLIBC_TUNABLES': tunables, LOADED: 'glibc (huge pages)'}


def _avx512() -> bool:
  try:
    return ' avx512f' in pathlib.Path('/proc/cpuinfo').read_text()
  except OSError:
    return False


def xla_cpu_flags(xla_flags: str) -> str:
  """`xla_flags` plus our XLA:CPU defaults for the flags it does not set."""
  ours = {'--xla_cpu_experimental_ynn_fusion_type': 'dot,eltwise,reduce'}
  if _avx512():
    ours['--xla_cpu_prefer_vector_width'] = '512'
  given = {flag.split('=')[0] for flag in xla_flags.split()}
  added = [f'{flag}={value}' for flag, value in ours.items() if flag not in given]
  return ' '.join([xla_flags, *added]).strip()


def configure() -> None:
  """Sets the XLA:CPU flags and re-executes this process once with the chosen allocator
  (see the module docstring); call it before jax starts its backend.

  The re-execution is skipped outside Linux, in the re-executed process, and for
  `T5X_LITE_ALLOCATOR=system`.
  """
  if os.environ.get(XLA_ENV, 'auto') != 'none':
    os.environ['XLA_FLAGS'] = xla_cpu_flags(os.environ.get('XLA_FLAGS', ''))
  if not sys.platform.startswith('linux') or os.environ.get(LOADED):
    return
  try:
    env = environment(os.environ.get(ENV, 'auto'))
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if env:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], dict(os.environ, **env))


def loaded() -> str:
  """The allocator this process was started with, for logs."""
  return os.environ.get(LOADED, 'system')
