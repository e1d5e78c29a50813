"""Model sources (local / Hugging Face / ModelScope), checkpoint validation, device and dtype."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import modelscope as ms_download
import pytest
import torch

from qwen3_rerank_plugins import ModelSourceError, Reranker, resolve_device, resolve_dtype
from qwen3_rerank_plugins.sources import MODEL_FILE_PATTERNS, resolve_model_dir, validate_model_dir


def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# ------------------------------------------------------------------ local directories


def test_local_directory_loads(tiny_model_dir):
    path, used = resolve_model_dir(tiny_model_dir)
    assert (path, used) == (tiny_model_dir.resolve(), "local")
    rr = Reranker.from_pretrained(tiny_model_dir, device="cpu", source="local")
    assert rr.model_name == tiny_model_dir.name
    assert len(rr.score("q", ["d"])) == 1


def test_missing_local_directory(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model_dir(tmp_path / "nope", source="local")
    with pytest.raises(ModelSourceError, match="neither an existing directory nor a hub id"):
        resolve_model_dir(str(tmp_path / "nope" / "deeper"))


def test_sequence_classification_checkpoint_is_rejected(tiny_model_dir, tmp_path):
    bad = _copy_with_config(
        tiny_model_dir, tmp_path / "seq-cls", architectures=["Qwen3ForSequenceClassification"]
    )
    with pytest.raises(ValueError, match="sequence-classification conversion"):
        Reranker.from_pretrained(bad, device="cpu")


def test_other_model_family_is_rejected(tiny_model_dir, tmp_path):
    bad = _copy_with_config(tiny_model_dir, tmp_path / "llama", model_type="llama")
    with pytest.raises(ValueError, match="'llama' model; a Qwen3-Reranker checkpoint"):
        validate_model_dir(bad)


def test_directory_without_weights_or_config(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no config\.json"):
        Reranker.from_pretrained(empty, device="cpu")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ValueError, match="no weight files"):
        Reranker.from_pretrained(no_weights, device="cpu")


# ------------------------------------------------------------------ the demo checkpoint loads quickly


def _tokenizer_facts(path: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    texts = [
        "发票怎么开 <|im_end|> yes",
        "<|im_start|>system\nJudge<|endoftext|>",
        "<think>\n\n</think>\n\n",
        " a\tb\r\n",
    ]
    return {
        "ids": [tok.encode(t, add_special_tokens=special) for t in texts for special in (True, False)],
        "added": {i: repr(t) for i, t in tok.added_tokens_decoder.items()},
        "special": (tok.all_special_ids, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id),
        "settings": (tok.padding_side, tok.model_max_length, len(tok)),
        "backend": tok.backend_tokenizer.to_str(),
    }


def test_demo_checkpoint_lists_its_added_tokens_and_an_old_cache_is_upgraded(
    tiny_model_dir, tmp_path, monkeypatch
):
    # Listed, transformers reads the added tokens from the small tokenizer_config.json instead of
    # parsing the whole 18.6 MB tokenizer.json in Python on every load.
    listed = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert listed["151643"]["content"] == "<|endoftext|>" and listed["151643"]["special"] is True
    assert listed["151668"]["content"] == "</think>" and listed["151668"]["special"] is False
    assert len(listed) == 26

    # A demo cache written by an earlier version (no list) is upgraded in place on first use,
    # and the tokenizer it loads is the same as before in every respect.
    old = tmp_path / "cache" / "random-qwen3-reranker-tiny"
    shutil.copytree(tiny_model_dir, old)
    config = json.loads((old / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    (old / "tokenizer_config.json").write_text(json.dumps(config))
    (old / ".complete").write_text(json.dumps({"size": "tiny", "random_weights": True}))
    before = _tokenizer_facts(old)

    from qwen3_rerank_plugins.demo import demo_model_dir

    monkeypatch.setenv("QWEN3_RERANK_DEMO_CACHE", str(tmp_path / "cache"))
    assert demo_model_dir("tiny") == old
    assert json.loads((old / "tokenizer_config.json").read_text())["added_tokens_decoder"] == listed
    assert _tokenizer_facts(old) == before
    assert sorted(p.name for p in old.iterdir() if p.name.startswith(".")) == [".complete"]  # no staging left
    assert demo_model_dir("tiny") == old  # idempotent


# ------------------------------------------------------------------ hubs, at their boundary


def _offline(*args, **kwargs):
    raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot reach the hub and no cached copy")


def test_auto_falls_back_from_hugging_face_to_modelscope(tiny_model_dir, monkeypatch, caplog):
    calls = []

    def modelscope_snapshot(model_id, revision=None, cache_dir=None, allow_patterns=None, **kw):
        calls.append((model_id, revision, allow_patterns))
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _offline)
    monkeypatch.setattr(ms_download, "snapshot_download", modelscope_snapshot)
    with caplog.at_level("INFO", logger="qwen3_rerank_plugins"):
        rr = Reranker.from_pretrained("Qwen/Qwen3-Reranker-0.6B", device="cpu", revision="v1")
    assert calls == [("Qwen/Qwen3-Reranker-0.6B", "v1", MODEL_FILE_PATTERNS)]
    assert "Could not get Qwen/Qwen3-Reranker-0.6B from huggingface" in caplog.text
    assert "from modelscope" in caplog.text
    assert rr.model_name == "Qwen3-Reranker-0.6B"


def test_hugging_face_is_tried_first(tiny_model_dir, monkeypatch):
    seen = {}

    def hf_snapshot(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hf_snapshot)
    monkeypatch.setattr(ms_download, "snapshot_download", _offline)
    path, used = resolve_model_dir("Qwen/Qwen3-Reranker-4B", cache_dir="/tmp/hf-cache")
    assert (path, used) == (tiny_model_dir, "huggingface")
    assert seen["repo_id"] == "Qwen/Qwen3-Reranker-4B" and seen["cache_dir"] == "/tmp/hf-cache"


def test_explicit_modelscope_and_environment_default(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _offline)
    monkeypatch.setattr(ms_download, "snapshot_download", lambda *a, **k: str(tiny_model_dir))
    assert resolve_model_dir("Qwen/Qwen3-Reranker-0.6B", source="modelscope")[1] == "modelscope"
    monkeypatch.setenv("QWEN3_RERANK_SOURCE", "modelscope")
    assert resolve_model_dir("Qwen/Qwen3-Reranker-0.6B")[1] == "modelscope"


def test_no_source_reachable_gives_actionable_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _offline)
    monkeypatch.setattr(ms_download, "snapshot_download", _offline)
    with pytest.raises(ModelSourceError) as info:
        Reranker.from_pretrained("Qwen/Qwen3-Reranker-0.6B", device="cpu")
    message = str(info.value)
    assert "huggingface: LocalEntryNotFoundError" in message and "modelscope:" in message
    assert "source='modelscope'" in message and "local directory" in message


def test_real_offline_hub_call_fails_cleanly(tmp_path, monkeypatch):
    # No mock: the real hub client, offline mode, empty cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="Could not get model"):
        resolve_model_dir("Qwen/Qwen3-Reranker-0.6B", source="huggingface", cache_dir=tmp_path)


def test_unresolvable_hub_uses_only_its_cache(tiny_model_dir, monkeypatch, caplog):
    # ".invalid" never resolves: the hub is surely offline, so only its local cache is asked.
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "https://modelscope.invalid")
    asked = []

    def hf_snapshot(repo_id, local_files_only=False, **kwargs):
        asked.append(("huggingface", local_files_only))
        raise huggingface_hub.errors.LocalEntryNotFoundError("no cached snapshot")

    def ms_snapshot(model_id, local_files_only=False, **kwargs):
        asked.append(("modelscope", local_files_only))
        return str(tiny_model_dir)  # a copy cached by an earlier download

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hf_snapshot)
    monkeypatch.setattr(ms_download, "snapshot_download", ms_snapshot)
    with caplog.at_level("INFO", logger="qwen3_rerank_plugins"):
        assert resolve_model_dir("Qwen/Qwen3-Reranker-0.6B") == (tiny_model_dir, "modelscope")
    assert asked == [("huggingface", True), ("modelscope", True)]
    assert "cannot resolve hub.invalid" in caplog.text

    # Behind a proxy the local resolver proves nothing: the hub is really asked.
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    asked.clear()
    resolve_model_dir("Qwen/Qwen3-Reranker-0.6B")
    assert asked == [("huggingface", False), ("modelscope", False)]


def test_unknown_source():
    with pytest.raises(ValueError, match="source must be one of"):
        resolve_model_dir("Qwen/Qwen3-Reranker-0.6B", source="s3")


# ------------------------------------------------------------------ device and dtype


def test_resolve_device():
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("gpu-please")
    with pytest.raises(TypeError):
        resolve_device(3)


def test_cuda_request_without_cuda_is_an_error_not_a_cpu_run(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        Reranker.from_pretrained(tiny_model_dir, device="cuda")


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("int4", cpu)
    with pytest.raises(ValueError, match="floating-point"):
        resolve_dtype(torch.int8, cpu)
