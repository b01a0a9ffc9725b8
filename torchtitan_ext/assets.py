"""Bundled training assets: a small BPE tokenizer and a text dataset, made locally.

torchtitan's debug configs read ``tests/assets/tokenizer`` and ``tests/assets/c4_test``,
which the torchtitan wheel does not ship, and this project must run with no network.
So we build both from text every Python install carries: the docstrings of the standard
library, read with ``ast`` from the source files (nothing is imported or executed).

The assets are built once and cached under ``$TORCHTITAN_EXT_CACHE`` (default
``~/.cache/torchtitan_ext``), keyed by a content version, so every rank and every run
reuses them. Building takes a few seconds; concurrent builders (one per rank) are
serialized by a file lock and publish with an atomic rename.
"""

from __future__ import annotations

import ast
import fcntl
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torchtitan.tools.logging import logger

# Bump when the recipe changes so stale caches are rebuilt.
ASSETS_VERSION = 1
VOCAB_SIZE = 2048  # torchtitan's llama3 debug model has vocab_size 2048
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
# Enough text for thousands of 8 x 256-token steps without repeating.
MAX_DATASET_BYTES = 6_000_000


@dataclass(frozen=True, slots=True)
class Assets:
    tokenizer_path: str
    """Folder with tokenizer.json and tokenizer_config.json (``--hf_assets_path``)."""
    dataset_path: str
    """Folder with one JSON-lines file of ``{"text": ...}`` (``--dataloader.dataset_path``)."""


def cache_root() -> Path:
    default = Path.home() / ".cache" / "torchtitan_ext"
    return Path(os.environ.get("TORCHTITAN_EXT_CACHE", default))


def stdlib_documents() -> list[str]:
    """One document per standard-library module: its module, class and function docstrings."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for name in sorted(sys.stdlib_module_names):
        candidates = [stdlib / f"{name}.py", stdlib / name / "__init__.py"]
        candidates += sorted((stdlib / name).glob("*.py")) if (stdlib / name).is_dir() else []
        for path in dict.fromkeys(candidates):
            if not path.is_file():
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue
            parts = []
            for node in ast.walk(tree):
                if isinstance(
                    node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
                ):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        parts.append(doc)
            if parts:
                documents.append("\n\n".join(parts))
    return documents


def _write_dataset(documents: list[str], folder: Path) -> None:
    folder.mkdir(parents=True)
    written = 0
    with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
        for doc in documents:
            if written >= MAX_DATASET_BYTES:
                break
            f.write(json.dumps({"text": doc}) + "\n")
            written += len(doc)


def _write_tokenizer(documents: list[str], folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump(config, f, indent=2)


def bundled_assets() -> Assets:
    """Where the bundled assets are (built or not): what config functions name, without
    file IO; the Trainer builds them (ensure_assets_for)."""
    final = cache_root() / f"assets-v{ASSETS_VERSION}"
    return Assets(tokenizer_path=str(final / "tokenizer"), dataset_path=str(final / "stdlib_docs"))


def ensure_assets_for(config) -> None:
    """Build the bundled assets if a Trainer.Config names them and they are not built."""
    bundled = bundled_assets()
    dataset_path = getattr(config.dataloader, "dataset_path", None)
    if config.hf_assets_path == bundled.tokenizer_path or dataset_path == bundled.dataset_path:
        ensure_assets()


def ensure_assets() -> Assets:
    """Return the bundled assets, building them on first use."""
    root = cache_root()
    assets = bundled_assets()
    final = Path(assets.tokenizer_path).parent
    if final.is_dir():
        return assets
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():  # another rank built it while we waited
            return assets
        logger.info(f"Building bundled tokenizer and dataset in {final} (once)")
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
        try:
            documents = stdlib_documents()
            _write_dataset(documents, staging / "stdlib_docs")
            _write_tokenizer(documents, staging / "tokenizer")
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return assets


def use_bundled_assets_if_missing(config) -> None:
    """Point a Trainer.Config at the bundled tokenizer and dataset when its own tokenizer
    folder does not exist (torchtitan's configs name assets that are downloaded by hand,
    and its debug configs name tests/assets, which the wheel does not ship)."""
    if os.path.exists(config.hf_assets_path):
        return
    assets = bundled_assets()
    logger.warning(
        f"Tokenizer folder {config.hf_assets_path} not found: using the bundled tokenizer and "
        "dataset (vocabulary of 2048). For real assets pass --hf_assets_path, "
        "--dataloader.dataset and --dataloader.dataset_path."
    )
    config.hf_assets_path = assets.tokenizer_path
    # The "c4_test" loader reads a local folder of JSON lines, which is what we bundle.
    config.dataloader.dataset = "c4_test"
    config.dataloader.dataset_path = assets.dataset_path
