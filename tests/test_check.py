"""The server checker against real HTTP servers on 127.0.0.1: our own service passes; small servers
written here, each reproducing one known serving bug on the same tiny weights, fail and are named.

The failing servers score with plain transformers (as the serving stacks do), not with the engine.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import FastAPI, Request
from tokenizers import Tokenizer

from helpers import ServerThread
from qwen3_rerank_plugins import Reranker, cli, get_reranker
from qwen3_rerank_plugins.check import EXIT_MISMATCH, check_server, load_battery
from qwen3_rerank_plugins.server import create_app
from reference import PREFIX, SUFFIX, body_token_ids, format_instruction

OTHER_INSTRUCTION = "Given the user query, retrieval the relevant passages"
MAX_LENGTH = 256  # the battery's long documents grow past this; small keeps the tests quick
CLASSES = {
    "english",
    "chinese",
    "instruction_given",
    "special_tokens",
    "empty_whitespace",
    "past_max_length",
    "duplicates",
}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Reranker:
    return get_reranker(tiny_model_dir, device="cpu", max_length=MAX_LENGTH)


# -- a deliberately wrong rerank server, one known bug at a time ---------------------------------------

Recipe = Callable[[Any, Any, str, list[str], str | None], list[float]]


@torch.no_grad()
def _log_odds(model: Any, tokenizer: Any, prompts: list[list[int]]) -> list[float]:
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    out = []
    for ids in prompts:  # one at a time: no padding to get wrong
        logits = model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
        out.append(float(logits[yes] - logits[no]))
    return out


@functools.cache
def _plain_tokenizer(tokenizer: Any) -> Tokenizer:
    """The tokenizer without its added tokens: text read as the characters it is made of."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["added_tokens"], spec["post_processor"] = [], None
    # The shared tokenizer keeps the truncation/padding of its last call (another test's): drop them.
    spec["truncation"], spec["padding"] = None, None
    return Tokenizer.from_str(json.dumps(spec))


def _plain(tokenizer: Any, text: str) -> list[int]:
    return _plain_tokenizer(tokenizer).encode(text, add_special_tokens=False).ids


def _template(tokenizer: Any, body: str, max_length: int = MAX_LENGTH) -> list[int]:
    """The model card's prompt: the template's control tokens parsed, the body plain and cut to fit."""
    prefix = tokenizer.encode(PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(SUFFIX, add_special_tokens=False)
    return prefix + _plain(tokenizer, body)[: max_length - len(prefix) - len(suffix)] + suffix


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _probabilities(model: Any, tokenizer: Any, prompts: list[list[int]]) -> list[float]:
    return [_sigmoid(z) for z in _log_odds(model, tokenizer, prompts)]


def no_template(model, tokenizer, query, docs, instruction):
    prompts = [_plain(tokenizer, format_instruction(instruction, query, d))[:MAX_LENGTH] for d in docs]
    return _probabilities(model, tokenizer, prompts)


def instruction_ignored(model, tokenizer, query, docs, instruction):
    prompts = [_template(tokenizer, format_instruction(None, query, d)) for d in docs]
    return _probabilities(model, tokenizer, prompts)


def sigmoid_twice(model, tokenizer, query, docs, instruction):
    prompts = [_template(tokenizer, format_instruction(instruction, query, d)) for d in docs]
    return [_sigmoid(p) for p in _probabilities(model, tokenizer, prompts)]


def suffix_cut(model, tokenizer, query, docs, instruction):
    # The whole prompt truncated from the right: a long document pushes the suffix out.
    prompts = [_template(tokenizer, format_instruction(instruction, query, d), 10**9) for d in docs]
    return _probabilities(model, tokenizer, [p[:MAX_LENGTH] for p in prompts])


def control_tokens_from_text(model, tokenizer, query, docs, instruction):
    # The model card's own code: documents tokenised with their special-token strings parsed.
    prompts = body_token_ids(tokenizer, [(query, d) for d in docs], instruction, MAX_LENGTH)
    return _probabilities(model, tokenizer, prompts)


def other_prompt(model, tokenizer, query, docs, instruction):
    # The evaluation scripts' prompt: blank lines between the parts and their own instruction.
    bodies = [f"<Instruct>: {OTHER_INSTRUCTION}\n\n<Query>: {query}\n\n<Document>: {d}" for d in docs]
    return _probabilities(model, tokenizer, [_template(tokenizer, b) for b in bodies])


def _wrong_server(hf_model: Any, recipe: Recipe) -> FastAPI:
    model, tokenizer = hf_model
    app = FastAPI()

    @app.post("/v1/rerank")
    async def rerank(request: Request) -> dict[str, Any]:
        body = await request.json()
        docs = [d if isinstance(d, str) else d["text"] for d in body["documents"]]
        scores = recipe(model, tokenizer, body["query"], docs, body.get("instruction"))
        order = sorted(range(len(docs)), key=lambda i: -scores[i])
        return {"results": [{"index": i, "relevance_score": scores[i]} for i in order]}

    return app


# -- the battery -----------------------------------------------------------------------------------


def test_the_battery_is_package_data_covering_every_class(engine: Reranker) -> None:
    classes, cases = load_battery(MAX_LENGTH, lambda t: len(engine.tokenizer.encode(t)))
    assert set(classes) == CLASSES
    assert {c.cls for c in cases} == CLASSES
    long_docs = [d for c in cases if c.cls == "past_max_length" for d in c.documents]
    assert max(len(engine.tokenizer.encode(d)) for d in long_docs) > MAX_LENGTH
    assert any(c.instruction for c in cases) and any(c.instruction is None for c in cases)
    assert any(d == "" for c in cases for d in c.documents)


# -- against real servers --------------------------------------------------------------------------------


def test_our_own_service_passes(engine: Reranker) -> None:
    with ServerThread(create_app(engine)) as server:
        report = check_server(server.url, engine)
    assert report.passed and report.cause is None
    assert {c.cls for c in report.classes} == CLASSES
    for summary in report.classes:
        assert summary.max_abs_logit < 1e-4 and summary.refused == 0
        assert summary.spearman is None or summary.spearman > 0.99
    text = report.format()
    assert "PASS" in text and "past_max_length" in text
    assert json.loads(json.dumps(report.to_dict()))["passed"] is True


@pytest.mark.parametrize(
    ("recipe", "cause", "differs"),
    [
        (no_template, "template missing", CLASSES),
        (instruction_ignored, "instruction ignored", {"instruction_given"}),
        (sigmoid_twice, "sigmoid applied twice", CLASSES),
        (suffix_cut, "suffix truncated", {"past_max_length"}),
        (control_tokens_from_text, "control tokens read from user text", {"special_tokens"}),
        (other_prompt, "the other published prompt format", CLASSES),
    ],
    ids=lambda v: v.__name__ if callable(v) else None,
)
def test_a_known_failure_fails_and_is_named(
    engine: Reranker, hf_model: Any, recipe: Recipe, cause: str, differs: set[str]
) -> None:
    with ServerThread(_wrong_server(hf_model, recipe)) as server:
        report = check_server(server.url, engine)
    assert not report.passed
    assert report.cause is not None and report.cause.startswith(cause), report.format()
    failing = {c.cls for c in report.classes if not c.passed}
    assert differs <= failing
    if differs != CLASSES:
        assert failing == differs, report.format()
    assert f"Likely cause: {cause}" in report.format()


def test_check_command_exit_status(
    engine: Reranker, tiny_model_dir: Path, hf_model: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", str(tiny_model_dir), "--device", "cpu", "--max-length", str(MAX_LENGTH)]
    with ServerThread(create_app(engine)) as server:
        assert cli.main(["--quiet", "check", server.url, *argv]) == 0
    assert "PASS" in capsys.readouterr().out
    with ServerThread(_wrong_server(hf_model, sigmoid_twice)) as server:
        assert cli.main(["--quiet", "check", f"{server.url}/v1/rerank", *argv, "--json"]) == EXIT_MISMATCH
    payload = json.loads(capsys.readouterr().out)
    assert payload["passed"] is False and payload["cause"].startswith("sigmoid applied twice")


def test_check_rejects_a_bad_url(engine: Reranker) -> None:
    with pytest.raises(ValueError, match="url must start with http"):
        check_server("localhost:8000", engine)


def test_check_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("url", "--tolerance", "--server-model", "--api-key", "--json", "--model", "--max-length"):
        assert option in out
