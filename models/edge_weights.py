"""The weights the edge runs: the pair's GGUF as it is, or re-quantized for this CPU.

On CPUs whose Q4 kernels are slow (the 2-core x86 machines here: FINDINGS,
"llama.cpp batched decoding"), the same weights stored as Q8_0 decode about 2x
faster and gain more from batching. A pair whose `edge.layout` is `q8_0` gets
its GGUF re-quantized once with llama.cpp's own quantizer
(`llama_model_quantize`, `allow_requantize`: the Q4_1 values are dequantized and
stored again as Q8_0, so the model is the same up to Q8_0's rounding) into
`$TANDEM_HOME/models/<pair>/edge-q8_0.gguf`, with a checksum record beside it,
as the cloud conversion does (`models.convert`). Preparing again returns at once
while the record still matches the source and the output.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from models.catalog import ModelPair
from models.convert import _exclusive, _sha256_file, edge_gguf_path
from models.errors import ConversionError
from models.settings import tandem_home

log = logging.getLogger(__name__)

# Bump when the quantized output changes, so old outputs are redone.
QUANTIZER_VERSION = 1
# llama.cpp's llama_ftype for each layout.
_FTYPES = {"q8_0": 7}  # LLAMA_FTYPE_MOSTLY_Q8_0


class QuantizeRecord(BaseModel):
    """What a re-quantized edge GGUF was made from, and its own hash (`<gguf>.json`)."""

    model_config = ConfigDict(extra="forbid")

    quantizer_version: int
    layout: str
    source: str
    source_size: int
    source_mtime_ns: int
    source_sha256: str
    output_sha256: str


def edge_weights_path(pair: ModelPair, home: Path | None = None) -> Path:
    """Where the GGUF the edge loads for `pair` lives (prepared or not)."""
    if pair.edge.layout == "gguf":
        return edge_gguf_path(pair)
    return (home or tandem_home()) / "models" / pair.name / f"edge-{pair.edge.layout}.gguf"


def prepare_edge_weights(pair: ModelPair, home: Path | None = None, force: bool = False) -> Path:
    """The GGUF the edge loads for `pair`, re-quantizing it first if its layout asks."""
    if pair.edge.layout == "gguf":
        return edge_gguf_path(pair)
    source, target = edge_gguf_path(pair), edge_weights_path(pair, home)
    if not force and _is_current(pair, source, target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / ".edge.lock"):
        if force or not _is_current(pair, source, target):
            _quantize(pair, source, target)
    return target


def _record_path(target: Path) -> Path:
    return target.with_suffix(".json")


def _is_current(pair: ModelPair, source: Path, target: Path) -> bool:
    try:
        record = QuantizeRecord.model_validate_json(_record_path(target).read_text("utf-8"))
    except FileNotFoundError:
        return False
    except (OSError, ValidationError) as exc:
        log.warning("ignoring unreadable %s (%s); quantizing again", _record_path(target), exc)
        return False
    if record.quantizer_version != QUANTIZER_VERSION or record.layout != pair.edge.layout:
        return False
    if not target.is_file() or _sha256_file(target) != record.output_sha256:
        return False
    stat = source.stat()
    if (record.source, record.source_size, record.source_mtime_ns) == (
        str(source),
        stat.st_size,
        stat.st_mtime_ns,
    ):
        return True
    return record.source_sha256 == _sha256_file(source)


def _quantize(pair: ModelPair, source: Path, target: Path) -> None:
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    layout = pair.edge.layout
    started = time.perf_counter()
    log.info("re-quantizing %s to %s in %s", source, layout, target)
    fd, name = tempfile.mkstemp(prefix=".edge-tmp-", suffix=".gguf", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = _FTYPES[layout]
        params.allow_requantize = True  # the source is quantized already
        params.nthread = 1
        with suppress_stdout_stderr(disable=False):  # llama.cpp logs every tensor
            status = llama_cpp.llama_model_quantize(
                str(source).encode(), str(tmp).encode(), llama_cpp.ctypes.byref(params)
            )
        if status != 0:
            raise ConversionError(
                f"llama.cpp could not re-quantize {source} to {layout} (status {status}); "
                "is it a GGUF model file?"
            )
        stat = source.stat()
        record = QuantizeRecord(
            quantizer_version=QUANTIZER_VERSION,
            layout=layout,
            source=str(source),
            source_size=stat.st_size,
            source_mtime_ns=stat.st_mtime_ns,
            source_sha256=_sha256_file(source),
            output_sha256=_sha256_file(tmp),
        )
        tmp.chmod(0o644)  # weights are not secrets; a daemon of another user reads them
        os.replace(tmp, target)  # atomic: readers see the old file or the new one
        _record_path(target).write_text(record.model_dump_json(indent=2), encoding="utf-8")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("re-quantized %s in %.1f s", pair.name, time.perf_counter() - started)
