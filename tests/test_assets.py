"""The bundled tokenizer and dataset."""

from __future__ import annotations

import json

from torchtitan.components.tokenizer import HuggingFaceTokenizer

from torchtitan_ext import assets


def test_build_from_scratch_then_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHTITAN_EXT_CACHE", str(tmp_path))
    built = assets.ensure_assets()
    folder = tmp_path / f"assets-v{assets.ASSETS_VERSION}"
    stamp = (folder / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    assert assets.ensure_assets() == built
    assert (folder / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == stamp, "rebuilt"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build-")]

    tokenizer = HuggingFaceTokenizer(tokenizer_path=built.tokenizer_path)
    assert tokenizer.get_vocab_size() == assets.VOCAB_SIZE
    ids = tokenizer.encode("Return the number of items in a container.", add_bos=True, add_eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert max(ids) < assets.VOCAB_SIZE
    assert tokenizer.decode(ids[1:-1]) == "Return the number of items in a container."

    with open(f"{built.dataset_path}/train.jsonl") as f:
        documents = [json.loads(line)["text"] for line in f]
    assert len(documents) > 300
    assert sum(len(d) for d in documents) > 1_000_000  # hundreds of thousands of tokens


def test_missing_tokenizer_folder_falls_back_to_bundled(tmp_path):
    from torchtitan.models.llama3.config_registry import llama3_8b

    config = llama3_8b()
    config.hf_assets_path = str(tmp_path / "absent")
    assets.use_bundled_assets_if_missing(config)
    bundled = assets.ensure_assets()
    assert config.hf_assets_path == bundled.tokenizer_path
    assert config.dataloader.dataset == "c4_test"
    assert config.dataloader.dataset_path == bundled.dataset_path

    config.hf_assets_path = str(tmp_path)  # exists: left alone
    assets.use_bundled_assets_if_missing(config)
    assert config.hf_assets_path == str(tmp_path)


def test_config_functions_name_the_assets_and_the_trainer_builds_them(tmp_path, monkeypatch):
    """Config functions only name the bundled assets (no file IO while parsing, which every
    rank and the launcher do); the Trainer builds them before torchtitan reads the tokenizer."""
    import config_registry

    monkeypatch.setenv("TORCHTITAN_EXT_CACHE", str(tmp_path))
    config = config_registry.llama3_debugmodel_autoparallel()
    assert config.hf_assets_path == assets.bundled_assets().tokenizer_path
    assert list(tmp_path.iterdir()) == []
    assets.ensure_assets_for(config)
    tokenizer = HuggingFaceTokenizer(tokenizer_path=config.hf_assets_path)
    assert tokenizer.get_vocab_size() == assets.VOCAB_SIZE
