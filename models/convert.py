"""Turn a pair's weights into the form each engine loads.

The edge loads a GGUF with llama.cpp. vLLM cannot load that GGUF, so for
`cloud.source: dequantize-edge` the GGUF is dequantized with transformers and
saved as HF safetensors (plus tokenizer and our chat template) under
`$TANDEM_HOME/models/<pair>/hf/`. A `checksum.json` next to the weights
records what they were made from; when it still matches, preparing again
returns at once without importing torch (the edge and `tandem up` call it on
every start).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from models.bundled import locate_bundled_gguf
from models.catalog import ModelPair
from models.chat_template import load_template
from models.errors import (
    ConversionError,
    MissingDependencyError,
    WeightsNotFoundError,
    one_line,
)
from models.settings import tandem_home

log = logging.getLogger(__name__)

# Bump when the output of the conversion changes, so old outputs are redone.
CONVERTER_VERSION = 1
CHECKSUM_FILE = "checksum.json"
CLOUD_DEPENDENCIES = ("torch", "transformers", "gguf", "safetensors")


class ConversionRecord(BaseModel):
    """What a converted HF directory was made from (its checksum.json)."""

    model_config = ConfigDict(extra="forbid")

    converter_version: int
    source: str
    source_size: int
    source_mtime_ns: int
    source_sha256: str
    dtype: str
    chat_template_sha256: str


def edge_gguf_path(pair: ModelPair) -> Path:
    """Return the path of the pair's edge GGUF, checking that it exists."""
    bundled = pair.edge.bundled
    if bundled is not None:
        return locate_bundled_gguf(*bundled)
    path = Path(pair.edge.gguf).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"edge GGUF of pair {pair.name!r} not found: {path}")
    return path


def cloud_weights_dir(pair: ModelPair, home: Path | None = None) -> Path:
    """Return where the pair's cloud weights live (converted or the user's HF dir)."""
    if not pair.cloud.dequantizes_edge:
        return Path(pair.cloud.source).expanduser()
    return (home or tandem_home()) / "models" / pair.name / "hf"


def is_prepared(pair: ModelPair, home: Path | None = None) -> bool:
    """Whether the pair's cloud weights are ready (cheap: compares file stats only)."""
    target = cloud_weights_dir(pair, home)
    if not pair.cloud.dequantizes_edge:
        return (target / "config.json").is_file()
    try:
        gguf = edge_gguf_path(pair)
    except WeightsNotFoundError:
        return False
    return _is_current(pair, gguf, target, rehash=False)


def prepare_cloud_weights(pair: ModelPair, home: Path | None = None, force: bool = False) -> Path:
    """Return the HF directory vLLM loads for `pair`, converting the edge GGUF if needed."""
    target = cloud_weights_dir(pair, home)
    if not pair.cloud.dequantizes_edge:
        return _check_hf_dir(pair, target)
    gguf = edge_gguf_path(pair)
    if not force and _is_current(pair, gguf, target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / ".lock"):
        # Another process may have converted it while this one waited.
        if force or not _is_current(pair, gguf, target):
            _convert(pair, gguf, target)
    return target


def _check_hf_dir(pair: ModelPair, path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise WeightsNotFoundError(
            f"cloud weights of pair {pair.name!r} not found: {path} has no config.json"
        )
    return path


def _is_current(pair: ModelPair, gguf: Path, target: Path, rehash: bool = True) -> bool:
    stored = _read_record(target)
    if stored is None or stored.converter_version != CONVERTER_VERSION:
        return False
    if stored.dtype != pair.cloud.dtype:
        return False
    if stored.chat_template_sha256 != _sha256_text(load_template(pair.chat_template)):
        return False
    # Same size and mtime: trust the stored hash rather than re-reading ~100 MB.
    if _same_stat(stored, gguf):
        return True
    return rehash and stored.source_sha256 == _sha256_file(gguf)


def _same_stat(record: ConversionRecord, gguf: Path) -> bool:
    stat = gguf.stat()
    return (
        record.source == str(gguf)
        and record.source_size == stat.st_size
        and record.source_mtime_ns == stat.st_mtime_ns
    )


def _read_record(target: Path) -> ConversionRecord | None:
    path = target / CHECKSUM_FILE
    try:
        return ConversionRecord.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as exc:
        log.warning("ignoring unreadable %s (%s); converting again", path, exc)
        return None


def _make_record(pair: ModelPair, gguf: Path) -> ConversionRecord:
    stat = gguf.stat()
    return ConversionRecord(
        converter_version=CONVERTER_VERSION,
        source=str(gguf),
        source_size=stat.st_size,
        source_mtime_ns=stat.st_mtime_ns,
        source_sha256=_sha256_file(gguf),
        dtype=pair.cloud.dtype,
        chat_template_sha256=_sha256_text(load_template(pair.chat_template)),
    )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # An OS lock, released by the kernel if the holder dies mid-conversion.
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(pair: ModelPair, gguf: Path, target: Path) -> None:
    modules = _import_cloud_dependencies()
    started = time.perf_counter()
    log.info("converting %s to HF safetensors (%s) in %s", gguf, pair.cloud.dtype, target)
    tmp = Path(tempfile.mkdtemp(prefix=".hf-tmp-", dir=target.parent))
    try:
        with _quiet_progress_bars(modules["transformers"]):
            _write_model(modules, gguf, tmp, pair.cloud.dtype)
            _write_tokenizer(modules, gguf, tmp, load_template(pair.chat_template))
        record = _make_record(pair, gguf)
        (tmp / CHECKSUM_FILE).write_text(record.model_dump_json(indent=2), encoding="utf-8")
        _make_readable(tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s in %.1f s", pair.name, time.perf_counter() - started)


@contextlib.contextmanager
def _quiet_progress_bars(transformers: Any) -> Iterator[None]:
    # transformers draws tqdm bars on stderr (its GGUF reader ignores
    # disable_progress_bar); the CLI shows its own spinner instead.
    hf_logging = transformers.utils.logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    bars = io.StringIO()
    try:
        with contextlib.redirect_stderr(bars):
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        log.debug("transformers progress output: %d characters hidden", len(bars.getvalue()))


def _import_cloud_dependencies() -> dict[str, Any]:
    modules, missing = {}, []
    for name in CLOUD_DEPENDENCIES:
        try:
            modules[name] = importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError("converting the edge GGUF to HF weights", missing)
    return modules


def _write_model(modules: dict[str, Any], gguf: Path, out: Path, dtype: str) -> None:
    torch, transformers = modules["torch"], modules["transformers"]
    try:
        quantized = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConversionError(f"transformers cannot load {gguf}: {one_line(exc)}") from exc
    # save_pretrained refuses a model loaded from GGUF ("quantized with gguf,
    # not serializable"): rebuild it from a config without the quantization
    # config and copy the dequantized weights over.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantized.state_dict())
    clean.to(getattr(torch, dtype))
    clean.config.dtype = dtype
    clean.save_pretrained(str(out))


def _write_tokenizer(modules: dict[str, Any], gguf: Path, out: Path, template: str) -> None:
    transformers = modules["transformers"]
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ConversionError(
            f"transformers cannot read the tokenizer of {gguf}: {one_line(exc)}"
        ) from exc
    # vLLM and transformers take the chat template from the tokenizer files.
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out))


def _make_readable(folder: Path) -> None:
    # mkdtemp (and safetensors) create private files; a vLLM worker running as
    # another user must read them, and weights are not secrets.
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _replace_dir(new: Path, target: Path) -> None:
    # A rename is atomic: readers see the old directory or the new one, never half.
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=".hf-old-", dir=target.parent))
    os.replace(target, old / "hf")
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
