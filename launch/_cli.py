"""Bad input to a launch script is one `error: ...` line on stderr and exit status 1: never absl's usage dump, never
a traceback.

    _cli.validate_sampling_flags("temperature", "top_p")   # checked as the flags are parsed
    ...
    app.run(main, flags_parser=_cli.parse_flags)

and in main, `except QwenJaxError as e: _cli.fail(e)`. A script that writes files a rerun resumes wraps its main in
`_cli.interruptible(main, "rerun the same command to resume")`: Ctrl-C and SIGTERM then unwind it like an error (its
`finally` blocks flush and release their locks) and end in one line and exit status 130 (SIGINT) or 143 (SIGTERM).

Kept apart from `_common`, whose mesh and multi-host flags
only the scripts that serve a model should define.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable
from typing import NoReturn

from absl import flags
from absl import logging as absl_logging

CPU_PATHS_ENV = "QWENJAX_CPU_PATHS"


def define_cpu_paths_flag(help_text: str) -> flags.FlagHolder:
  """Defines --cpu_paths for a script that serves a model (`use_cpu_paths` reads it): default $QWENJAX_CPU_PATHS,
  else "auto"."""
  return flags.DEFINE_string("cpu_paths", os.environ.get(CPU_PATHS_ENV, "auto"), help_text)


def use_cpu_paths(value: str, mode: str) -> dict | None:
  """Activates the matmul paths of a record (`qwenjax.kernels.cpu_paths`) for every mode it holds, and puts the XLA:CPU
  flags of `mode` in XLA_FLAGS (an XLA_FLAGS of the user's wins); returns the record, or None. value: "default" (XLA's
  own paths: nothing to do), "auto" (this processor's record under the cache directory; a mode it lacks is probed
  first, in a subprocess, since each XLA configuration needs a process of its own, and kept for the next run), or a
  record file. Nothing where jax computes elsewhere (JAX_PLATFORMS, or a TPU/GPU plugin installed). Must run before
  jax starts its backend."""
  import subprocess  # pylint: disable=g-import-not-at-top

  from qwenjax import ConfigError  # pylint: disable=g-import-not-at-top
  from qwenjax.engine import cpu_records  # pylint: disable=g-import-not-at-top
  from qwenjax.kernels import cpu_paths  # pylint: disable=g-import-not-at-top

  platforms = os.environ.get("JAX_PLATFORMS", "")
  if value == "default" or (platforms.split(",")[0] or "cpu") != "cpu" or (
      not platforms and cpu_paths.accelerator_installed()):
    return None
  if value != "auto":
    record = cpu_paths.read_record(value)
  else:
    path = cpu_records.record_path()
    record = cpu_paths.read_record(path) if path.is_file() else {"timings": []}
    if mode not in cpu_paths.record_modes(record):
      absl_logging.warning("No matmul path record for %s on this processor yet: probing it once (%s).", mode, path)
      cmd = [sys.executable, "-m", "launch.bench.cpu_paths", f"--modes={mode}", "--merge", f"--output={path}"]
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
      if proc.returncode != 0:
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or [f"exit {proc.returncode}"]
        raise ConfigError(f"probing the matmul paths failed: {tail[0]} (--cpu_paths=default skips them).")
      record = cpu_paths.read_record(path)
  modes = cpu_paths.record_modes(record)
  if mode not in modes:
    raise ConfigError(f"--cpu_paths={value}: the record holds no {mode} timings (it has {', '.join(modes) or 'none'}).")
  # One XLA configuration per process: every other mode chooses among that configuration's timings.
  paths, own_config, flags_set = cpu_records.use_record(record, mode)
  absl_logging.info("Matmul paths (%s, %s): XLA:CPU configuration %r%s.", record.get("processor", "?"), mode,
                    paths.config, f", XLA_FLAGS={flags_set}" if flags_set else (
                        f" (XLA_FLAGS of your own; {own_config!r} was chosen)" if paths.config != own_config else ""))
  absl_logging.vlog(1, "Matmul path record:\n%s\nChosen:\n%s", cpu_paths.format_table(record), paths.describe())
  return record


def fail(error: BaseException | str) -> NoReturn:
  """Prints `error: <error>` on one line to stderr and exits with status 1.

  The line stays the last: a write the error abandoned (orbax's async serialization, say) can leave a coroutine
  that was never awaited, and Python would warn of it at exit, after the error."""
  text = " ".join(str(error).split()) or type(error).__name__
  print(f"error: {text if text.endswith(('.', '?', '!')) else text + '.'}", file=sys.stderr)
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
  sys.exit(1)


class Terminated(BaseException):
  """SIGTERM, raised in the main thread as SIGINT raises KeyboardInterrupt, so that it unwinds the same way."""


_pending: BaseException | None = None  # the interrupt being handled, once a signal came
_swallowed = False  # it struck inside a gc callback or a __del__, where Python can only print it


def check_interrupted() -> None:
  """Raises the interrupt again if it struck where Python swallows exceptions (a gc callback, such as jax's, or a
  `__del__`: printed as "Exception ignored", and the program went on). Long loops call this at safe points."""
  global _swallowed
  if _swallowed:
    _swallowed = False
    raise _pending


def _on_signal(signum, frame):
  del frame
  global _pending
  if _pending is not None:  # a second signal: ignored while the first unwinds, raised if the first was swallowed
    check_interrupted()
    return
  _pending = KeyboardInterrupt() if signum == signal.SIGINT else Terminated()
  raise _pending


def _on_unraisable(args) -> None:
  global _swallowed
  if _pending is not None and args.exc_value is _pending:
    _swallowed = True  # no "Exception ignored ... Traceback": check_interrupted() raises it where it can unwind
    return
  sys.__unraisablehook__(args)


def interruptible(main: Callable, resume: str) -> Callable:
  """`main` with SIGINT and SIGTERM turned into one `interrupted (SIGINT); <resume>` line on stderr and exit status
  130 or 143, after `main`'s own `finally` blocks ran (a second signal during that unwinding is ignored). A signal
  that strikes inside a gc callback, where Python swallows exceptions, is raised again at the next
  `check_interrupted()` (or when `main` returns). A signal ignored when the program started stays ignored."""

  @functools.wraps(main)
  def wrapped(argv):
    global _pending, _swallowed
    _pending, _swallowed = None, False
    for signum in (signal.SIGINT, signal.SIGTERM):
      if signal.getsignal(signum) is not signal.SIG_IGN:
        signal.signal(signum, _on_signal)
    sys.unraisablehook = _on_unraisable
    try:
      result = main(argv)
      check_interrupted()
      return result
    except (KeyboardInterrupt, Terminated) as e:
      signal.signal(signal.SIGINT, signal.SIG_IGN)
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
      name, status = ("SIGINT", 130) if isinstance(e, KeyboardInterrupt) else ("SIGTERM", 143)
      print(f"interrupted ({name}); {resume}.", file=sys.stderr, flush=True)
      sys.exit(status)

  return wrapped


def parse_flags(argv: list[str]) -> list[str]:
  """absl.app.run's flags_parser: a malformed, out-of-range, unknown or missing flag, or a positional argument
  (launch scripts take flags only), fails with `error: --flag: what is wrong`. --help and --flagfile work as
  ever."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    fail(_flag_error(e))
  if len(rest) > 1:
    fail(f"unexpected argument {rest[1]!r}; flags are given as --name=value")
  if flags.FLAGS["verbosity"].value < 1:
    # jax's INFO lines are not news to a user: on every CPU machine the first would be that libtpu.so is missing.
    # Its warnings still show, and --verbosity=1 shows everything.
    logging.getLogger("jax").setLevel(logging.WARNING)
  return rest


def _flag_error(error: flags.Error) -> str:
  """absl's message, which may span lines (one per failed validator), as its first error, led by the flag."""
  text = str(error).strip()
  if isinstance(error, flags.UnrecognizedFlagError):
    tip = re.search(r"Did you mean: (.+) \?$", text)
    tip = f" (did you mean {', '.join('--' + s for s in tip.group(1).split(', '))}?)" if tip else ""
    return f"--{error.flagname}: unknown flag{tip}"
  if isinstance(error, flags.CantOpenFlagFileError):
    return "--flagfile: " + text.removeprefix("ERROR:: Unable to open flagfile: ")
  first = text.splitlines()[0] if text else type(error).__name__
  if m := re.fullmatch(r"flag --([^=]+)=.*?: (.*)", first):  # a value that failed parsing or a validator
    name, problem = m.groups()
    if problem == f"Flag --{name} must have a value other than None.":
      problem = "this flag is required"
    return f"--{name}: {problem}"
  if m := re.fullmatch(r"Missing value for flag (\S+)", first):
    return f"{m.group(1)}: missing value"
  return first


def validate_sampling_flags(*names: str, **renamed: str) -> None:
  """Checks, as flags are parsed, that each flag is a valid value of the `qwenjax.SamplingParams` field of its
  name (or, in `renamed`, flag name -> field), with SamplingParams' own rule and message."""

  def validator(field):
    def check(value):
      from qwenjax import QwenJaxError, SamplingParams  # pylint: disable=g-import-not-at-top  (--help stays fast)

      try:
        SamplingParams(**{field: value})
      except QwenJaxError as e:
        raise flags.ValidationError(str(e)) from None
      return True

    return check

  for name, field in {**{n: n for n in names}, **renamed}.items():
    flags.register_validator(name, validator(field))
