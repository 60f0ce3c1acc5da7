"""Tandem models: the catalog of draft/target pairs, their weights, templates and checks.

Importing this package is cheap: torch, transformers and llama_cpp are
imported only inside the functions that need them.

    >>> from models import Catalog, edge_gguf_path, render_chat, load_template
    >>> pair = Catalog.load().default()
    >>> prompt = render_chat(load_template(pair.chat_template),
    ...                      [{"role": "user", "content": "Hi"}])
"""

from models.bundled import locate_bundled_gguf
from models.catalog import (
    BUILTIN_PAIRS,
    DEFAULT_N_CTX,
    DEFAULT_PAIR,
    DEQUANTIZE_EDGE,
    Catalog,
    CatalogFile,
    CloudModel,
    EdgeModel,
    ModelPair,
)
from models.chat_template import load_template, render_chat, template_names
from models.convert import (
    CONVERTER_VERSION,
    ConversionRecord,
    cloud_weights_dir,
    edge_gguf_path,
    is_prepared,
    prepare_cloud_weights,
)
from models.edge_weights import (
    QUANTIZER_VERSION,
    QuantizeRecord,
    edge_weights_path,
    prepare_edge_weights,
)
from models.errors import (
    CatalogError,
    ConversionError,
    IncompatibleVocabError,
    MissingDependencyError,
    ModelError,
    ModelNotFoundError,
    TemplateNotFoundError,
    TemplateRenderError,
    WeightsNotFoundError,
)
from models.latency import EngineKind
from models.settings import ModelSettings, tandem_home
from models.vocab import (
    VocabMismatch,
    VocabReport,
    check_vocab_compatible,
    llama_token_bytes,
    require_compatible,
)

__all__ = [
    "BUILTIN_PAIRS",
    "CONVERTER_VERSION",
    "DEFAULT_N_CTX",
    "DEFAULT_PAIR",
    "DEQUANTIZE_EDGE",
    "QUANTIZER_VERSION",
    "Catalog",
    "CatalogError",
    "CatalogFile",
    "CloudModel",
    "ConversionError",
    "ConversionRecord",
    "EdgeModel",
    "EngineKind",
    "IncompatibleVocabError",
    "MissingDependencyError",
    "ModelError",
    "ModelNotFoundError",
    "ModelPair",
    "ModelSettings",
    "QuantizeRecord",
    "TemplateNotFoundError",
    "TemplateRenderError",
    "VocabMismatch",
    "VocabReport",
    "WeightsNotFoundError",
    "check_vocab_compatible",
    "cloud_weights_dir",
    "edge_gguf_path",
    "edge_weights_path",
    "is_prepared",
    "llama_token_bytes",
    "load_template",
    "locate_bundled_gguf",
    "prepare_cloud_weights",
    "prepare_edge_weights",
    "render_chat",
    "require_compatible",
    "tandem_home",
    "template_names",
]
