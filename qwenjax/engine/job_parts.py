"""A multi-host run's parts: replica i of a job over several hosts writes its records to `<output>.part-<i>`
(`part_path`), and a later run, or the end of this one, merges them into the output (`merge_parts`).

    with jobs.OutputLock("out.jsonl"):
      job_parts.merge_parts("out.jsonl", job_parts.existing_parts("out.jsonl"))   # leftovers of any host count

Exactly once: the merge appends to the output only the ids it lacks, fsyncs it, and only then removes the parts,
so a merge cut short (QWENJAX_CRASH_AT="merge:<n>") is redone by the next run. A part is merged and removed only
when it is a regular file (never a link) that holds results (`jobs.recover`).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence

from qwenjax import _files
from qwenjax._errors import InputError
from qwenjax.engine.jobs import ResultWriter, iter_records, recover

PART_SUFFIX = ".part-"


def part_path(output: str, index: int) -> str:
  """The results file replica `index` of a multi-host run writes."""
  return f"{output}{PART_SUFFIX}{index}"


def existing_parts(output: str) -> list[str]:
  """Every `<output>.part-<i>` there is, by index: left by a run with any number of hosts, not only this one's.
  InputError, untouched, for one that is a link or not a regular file: a part is never read through a link."""
  pattern = re.compile(re.escape(os.path.basename(output) + PART_SUFFIX) + r"(\d+)")
  found = []
  for path in glob.glob(glob.escape(output + PART_SUFFIX) + "*"):
    m = pattern.fullmatch(os.path.basename(path))
    if not m:
      continue
    if os.path.islink(path) or not os.path.isfile(path):
      kind = "a symbolic link" if os.path.islink(path) else "not a regular file"
      raise InputError(f"--output={output}: {path} is {kind}, not a part a job wrote; refusing to merge or remove "
                       "it (move it away).")
    found.append((int(m.group(1)), path))
  return [path for _, path in sorted(found)]


def merge_parts(output: str, parts: Sequence[str], **writer_kwargs) -> int:
  """Appends to the output each record of the parts whose id it does not hold yet, fsyncs it, then removes the
  parts; returns how many records it added. Safe to cut short at any moment: the next merge recovers a torn last
  line and skips what is already there. Only results are merged and removed: `recover` refuses (InputError,
  untouched) a part that holds none, and an empty part (a replica killed before its first record) is removed.
  The caller holds the output's lock."""
  present = recover(output).ids
  added = 0
  parts = [p for p in parts if os.path.lexists(p)]
  for part in parts:
    if os.path.islink(part) or not os.path.isfile(part):
      raise InputError(f"--output={output}: {part} is not a regular file; refusing to merge it.")
    recover(part)
  with ResultWriter(output, crash_label="merge", **writer_kwargs) as out:
    for part in parts:
      for record, key in iter_records(part):
        if key not in present:
          out.write_raw(record)
          present.add(key)
          added += 1
  # Only now, the output fsynced with every record: the parts go.
  for part in parts:
    os.remove(part)
  if parts:
    _files.fsync_directory(output)
  return added
