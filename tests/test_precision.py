"""CPU precision by instruction set: capability detection, what ``dtype="auto"`` picks, the warning
for emulated half precision, and the int8 path's agreement with float32.

The CPU's flags are injected, so both branches of every choice run on any machine.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import FAQ_DOCS, FAQ_QUERY
from qwen3_rerank_plugins import Reranker, get_reranker
from qwen3_rerank_plugins.backend import Int8Linear
from qwen3_rerank_plugins.device import (
    CPU_AUTO_MEASUREMENTS,
    CpuFeatures,
    Measured,
    Precision,
    SlowPrecisionWarning,
    auto_cpu_precision,
    cpu_features,
    resolve_dtype,
    resolve_precision,
    warn_if_emulated,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import spearman, top_k_agreement  # noqa: E402

CPU = torch.device("cpu")
# Int8Linear's weight range on this CPU: without VNNI, 8-bit weights saturate oneDNN's 16-bit sums.
WEIGHT_MAX = 127 if cpu_features().vnni else 63
# Flags as /proc/cpuinfo spells them on the CPUs the project meets.
AVX2_EPYC = {"sse4_2", "avx", "avx2", "fma", "f16c"}
ZEN4_EPYC = AVX2_EPYC | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}
SAPPHIRE_RAPIDS = ZEN4_EPYC | {"avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"}
ICE_LAKE = AVX2_EPYC | {"avx512f", "avx512bw", "avx512_vnni"}


# ------------------------------------------------------------------ capability detection


def test_features_of_an_avx2_only_cpu():
    cpu = cpu_features(AVX2_EPYC, "AVX2")
    assert cpu.avx2 and not cpu.avx512 and not cpu.avx512_vnni and not cpu.amx
    assert not cpu.native_bf16 and not cpu.native_fp16 and not cpu.vnni
    assert cpu.name == "AVX2"
    assert "AVX2" in cpu.describe() and "emulated" in cpu.describe()


def test_features_of_avx512_cpus():
    zen4 = cpu_features(ZEN4_EPYC, "AVX512")
    assert zen4.avx512_vnni and zen4.avx512_bf16 and zen4.native_bf16 and zen4.vnni
    assert not zen4.native_fp16 and not zen4.amx
    assert zen4.name == "AVX512+VNNI+BF16"
    ice = cpu_features(ICE_LAKE, "AVX512")
    assert ice.avx512_vnni and not ice.native_bf16 and ice.name == "AVX512+VNNI"
    spr = cpu_features(SAPPHIRE_RAPIDS, "AVX512")
    assert spr.amx and spr.native_bf16 and spr.native_fp16 and spr.name == "AMX"


def test_capped_dispatch_counts_as_the_capped_level():
    # ATEN_CPU_CAPABILITY=avx2 on an AVX512-BF16 CPU: torch runs no AVX512 code, bf16 is emulated.
    capped = cpu_features(ZEN4_EPYC, "AVX2")
    assert not capped.avx512 and not capped.native_bf16 and capped.name == "AVX2"


def test_this_machine_is_read_from_torch_and_cpuinfo():
    here = cpu_features()
    assert here.capability == torch.backends.cpu.get_cpu_capability()
    assert isinstance(here.flags, frozenset)
    assert cpu_features() is here  # read once


# ------------------------------------------------------------------ what auto picks


def test_auto_keeps_float32_where_bf16_is_emulated_even_if_measured_fast_elsewhere():
    fast = {"bfloat16": {"AVX2": Measured(2.0, True), "AVX512+VNNI+BF16": Measured(2.0, True)}}
    assert auto_cpu_precision(cpu_features(AVX2_EPYC, "AVX2"), fast) == "float32"
    assert auto_cpu_precision(cpu_features(ZEN4_EPYC, "AVX2"), {"bfloat16": {}}) == "float32"


def test_auto_picks_bf16_only_where_native_faster_and_in_agreement():
    zen4 = cpu_features(ZEN4_EPYC, "AVX512")
    assert auto_cpu_precision(zen4, {"bfloat16": {zen4.name: Measured(1.8, True)}}) == "bfloat16"
    assert auto_cpu_precision(zen4, {"bfloat16": {zen4.name: Measured(0.9, True)}}) == "float32"
    assert auto_cpu_precision(zen4, {"bfloat16": {zen4.name: Measured(1.8, False)}}) == "float32"
    assert auto_cpu_precision(zen4, {}) == "float32"  # not measured: the exact path


def test_auto_picks_int8_only_where_measured_faster_and_in_agreement():
    avx2 = cpu_features(AVX2_EPYC, "AVX2")
    assert auto_cpu_precision(avx2, {"int8": {"AVX2": Measured(1.7, True)}}) == "int8"
    assert auto_cpu_precision(avx2, {"int8": {"AVX2": Measured(1.7, False)}}) == "float32"
    assert auto_cpu_precision(avx2, {"int8": {"AVX512+VNNI": Measured(1.7, True)}}) == "float32"


def test_resolve_precision_on_cpu_follows_the_cpu():
    zen4 = cpu_features(ZEN4_EPYC, "AVX512")
    assert resolve_precision("auto", CPU, cpu_features(AVX2_EPYC, "AVX2")) == Precision(torch.float32)
    expected = auto_cpu_precision(zen4)  # the measured table decides for this CPU class
    assert resolve_precision("auto", CPU, zen4).name == expected
    assert resolve_precision("int8", CPU) == Precision(torch.float32, "int8")
    assert resolve_precision("int8", CPU).name == "int8"
    assert resolve_dtype("int8", CPU) == torch.float32  # int8 loads float32 weights, then quantizes
    with pytest.raises(ValueError, match="CPU path"):
        resolve_precision("int8", torch.device("cuda"))
    with pytest.raises(ValueError, match="'int8'"):
        resolve_precision("int4", CPU)


def test_auto_keeps_float32_on_the_measured_avx512_bf16_epyc():
    # Measured there: bf16 and int8 faster, but neither within Spearman >= 0.99 on every workload.
    zen4 = cpu_features(ZEN4_EPYC, "AVX512")
    assert CPU_AUTO_MEASUREMENTS["bfloat16"][zen4.name].speedup > 1
    int8 = CPU_AUTO_MEASUREMENTS["int8"][zen4.name]
    assert (
        int8.speedup > 1 and not int8.agrees
    )  # faster, but W2's Spearman is 0.943 with the default instruction
    assert auto_cpu_precision(zen4) == "float32"
    assert resolve_dtype("auto", CPU) == torch.float32


def test_the_measured_table_only_holds_wins_it_can_justify():
    for precision, classes in CPU_AUTO_MEASUREMENTS.items():
        assert precision in ("bfloat16", "int8")
        for measured in classes.values():
            assert measured.where, "every entry names the results file that measured it"


# ------------------------------------------------------------------ the warning


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_half_precision_warns_with_capability_slowdown_and_better_choice(dtype, caplog):
    avx2 = cpu_features(AVX2_EPYC, "AVX2")
    with (
        caplog.at_level(logging.WARNING, logger="qwen3_rerank_plugins.device"),
        pytest.warns(SlowPrecisionWarning) as record,
    ):
        assert warn_if_emulated(Precision(dtype), CPU, avx2)
    message = str(record[0].message)
    assert "torch CPU capability AVX2" in message
    assert "SLOWER than float32" in message and "4.5x" in message
    assert "dtype='float32'" in message and "dtype='int8'" not in message  # int8 is no faster there
    assert any(r.levelno == logging.WARNING and "AVX2" in r.getMessage() for r in caplog.records)
    # Where int8 runs on VNNI, it is the faster alternative to name.
    with pytest.warns(SlowPrecisionWarning, match="dtype='int8'"):
        warn_if_emulated(
            Precision(dtype), CPU, cpu_features(AVX2_EPYC | {"avx512f", "avx512_vnni"}, "AVX512")
        )


def test_int8_without_vnni_warns_with_capability_and_measurement(caplog):
    avx2 = cpu_features(AVX2_EPYC, "AVX2")
    with (
        caplog.at_level(logging.WARNING, logger="qwen3_rerank_plugins.device"),
        pytest.warns(SlowPrecisionWarning) as record,
    ):
        assert warn_if_emulated(Precision(torch.float32, "int8"), CPU, avx2)
    message = str(record[0].message)
    assert "torch CPU capability AVX2" in message and "VNNI" in message
    assert "1.02-1.16x float32" in message and "dtype='float32'" in message
    assert any(r.levelno == logging.WARNING and "int8" in r.getMessage() for r in caplog.records)


def test_native_or_full_precision_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_emulated(Precision(torch.bfloat16), CPU, cpu_features(ZEN4_EPYC, "AVX512"))
        assert not warn_if_emulated(Precision(torch.float16), CPU, cpu_features(SAPPHIRE_RAPIDS, "AVX512"))
        assert not warn_if_emulated(Precision(torch.float32), CPU, cpu_features(AVX2_EPYC, "AVX2"))
        assert not warn_if_emulated(Precision(torch.float32, "int8"), CPU, cpu_features(ZEN4_EPYC, "AVX512"))
        assert not warn_if_emulated(
            Precision(torch.bfloat16), torch.device("cuda"), cpu_features(AVX2_EPYC, "AVX2")
        )


def test_loading_in_emulated_half_precision_warns(tiny_model_dir):
    here = cpu_features()
    if here.native_fp16:
        pytest.skip("this CPU has native float16")
    with pytest.warns(SlowPrecisionWarning, match=here.capability):
        rr = Reranker.from_pretrained(tiny_model_dir, device="cpu", dtype="float16")
    assert rr.dtype == torch.float16


# ------------------------------------------------------------------ the int8 path


@pytest.fixture(scope="module")
def int8(tiny_model_dir: Path) -> Reranker:
    return Reranker.from_pretrained(tiny_model_dir, device="cpu", dtype="int8")


def test_int8_quantizes_the_backbone_and_keeps_a_float32_head(int8: Reranker):
    assert int8.quantization == "int8" and int8.dtype == torch.float32
    assert "dtype='int8'" in repr(int8)
    assert int8._core.head.dtype == torch.float32
    linear = [m for m in int8._core.backbone.modules() if type(m) is torch.nn.Linear]
    quantized = [m for m in int8._core.backbone.modules() if isinstance(m, Int8Linear)]
    assert not linear and quantized  # every linear layer of the backbone, nothing else


def test_int8_agrees_with_float32_on_the_tiny_model(int8: Reranker, reranker: Reranker):
    docs = [d for d in FAQ_DOCS if d.strip()] + [
        "发票怎么开？请在订单详情页申请。",
        "Shipping usually takes two days.",
        "订单已发货，物流单号见短信。",
    ]
    fp32 = reranker.score(FAQ_QUERY, docs, return_logits=True)
    low = int8.score(FAQ_QUERY, docs, return_logits=True)
    # Measured on the tiny model (hidden 64, weights of std 0.2, so far coarser than a real one):
    # max |Δlogit| 0.038 on log-odds spread over 1.6, Spearman 0.976, top-3 100 % (one int8
    # digit per activation reached 0.072 and Spearman 0.952; one scale per pass, 0.35). CPUs
    # without VNNI get 7-bit weights: 0.123, Spearman 0.976, top-3 100 %.
    bound = 0.08 if cpu_features().vnni else 0.2
    assert max(abs(a - b) for a, b in zip(fp32, low, strict=True)) < bound
    assert spearman(fp32, low) > 0.95
    assert top_k_agreement(fp32, low, k=3) == 1.0


@pytest.fixture(scope="module")
def six_layer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmarks' random model: the 0.6B shape with 6 of its layers, each of the real size."""
    import dataclasses

    from qwen3_rerank_plugins import demo

    with pytest.MonkeyPatch.context() as patch:
        shape = dataclasses.replace(demo.MODEL_SHAPES["0.6b"], num_hidden_layers=6)
        patch.setitem(demo.MODEL_SHAPES, "0.6b-6layers", shape)
        return demo.create_random_reranker(tmp_path_factory.mktemp("rr6"), "0.6b-6layers")


@pytest.mark.parametrize(
    "vnni",
    [
        pytest.param(
            True,
            id="8-bit weights",
            marks=pytest.mark.skipif(
                not cpu_features().vnni, reason="8-bit int8 weights need VNNI/AMX (AVX2 saturates)"
            ),
        ),
        pytest.param(False, id="7-bit weights"),
    ],
)
def test_int8_agrees_with_float32_on_the_6_layer_model(six_layer_dir: Path, vnni: bool):
    from workloads import build_workloads

    from qwen3_rerank_plugins.backend import quantize_int8
    from qwen3_rerank_plugins.templates import resolve_instruction

    fp32 = Reranker.from_pretrained(six_layer_dir, device="cpu")
    int8 = Reranker.from_pretrained(six_layer_dir, device="cpu")
    # 7-bit weights are what CPUs without VNNI get; their products are exact on every CPU.
    quantize_int8(int8._core, vnni=vnni)
    # The benchmark's W1 (Chinese FAQ) and W3 (English passages) with their own instructions, as
    # in RESULTS-precision.md. Random weights pack a request's log-odds into about 0.5, with
    # neighbours 0.012 apart, a harder test of ranks than a trained model's spread sets.
    # Measured with 8-bit weights: max |Δlogit| 0.066 (W1) and 0.039 (W3), Spearman 1.0 and
    # top-3 100 % on every request; with 7-bit weights 0.070 and 0.115, and W3 Spearman 0.80
    # (top-3 67 %): one swap, which is why int8 without VNNI is warned against.
    for workload in build_workloads("cpu", names=["W1", "W3"]):
        worst = 0.0
        for request in workload.requests:
            instruction = resolve_instruction(request.instruction)
            exact = fp32.score(request.query, request.documents, instruction, return_logits=True)
            low = int8.score(request.query, request.documents, instruction, return_logits=True)
            worst = max(worst, *(abs(a - b) for a, b in zip(exact, low, strict=True)))
            if vnni:
                assert spearman(exact, low) >= 0.99, workload.name
                assert top_k_agreement(exact, low, k=3) == 1.0, workload.name
        assert worst < (0.1 if vnni else 0.2), workload.name


def test_int8_keeps_prefix_reuse_and_cross_query_batching(int8: Reranker):
    from qwen3_rerank_plugins import ScoreGroup

    docs = [d for d in FAQ_DOCS if d.strip()]
    alone = int8.score(FAQ_QUERY, docs, return_logits=True)
    no_reuse = int8.with_settings(prefix_cache=False).score(FAQ_QUERY, docs, return_logits=True)
    merged = int8.score_groups([ScoreGroup(FAQ_QUERY, docs), ScoreGroup("退货怎么办", docs[:3])])
    # Activations are quantized per token, so a score does not depend on the other rows of its
    # forward pass: alone and merged agree as in float32 (measured: identical), and without prefix
    # reuse only float rounding differs (measured: 5e-7).
    assert merged[0].logits == pytest.approx(alone, abs=1e-5)
    assert no_reuse == pytest.approx(alone, abs=1e-4)


def test_an_int8_score_does_not_depend_on_its_batch_mates(int8: Reranker):
    docs = [d for d in FAQ_DOCS if d.strip()]
    together = int8.score(FAQ_QUERY, docs, return_logits=True)
    alone = [int8.score(FAQ_QUERY, [d], return_logits=True)[0] for d in docs]
    reversed_order = int8.score(FAQ_QUERY, docs[::-1], return_logits=True)[::-1]
    # Scales are per token and the int8 product accumulates exactly in int32, so a document's
    # score is the same alone, among others, or in another order, up to float rounding: float32
    # attention over a padded batch differs from a lone pass by 7e-7 here, and the activations'
    # second digit rounds that either way, through two layers of this model's wide weights
    # (measured 5e-6 to 5e-5 as the rounding falls, against int8's own error of 4e-2).
    assert together == pytest.approx(alone, abs=2e-4)
    assert together == pytest.approx(reversed_order, abs=2e-4)


def test_int8_can_keep_named_layers_in_float32(tiny_model_dir: Path):
    from qwen3_rerank_plugins.backend import quantize_int8

    rr = Reranker.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    quantize_int8(rr._core, keep_float=("*.down_proj", "layers.1.self_attn.k_proj"))
    kept = {n for n, m in rr._core.backbone.named_modules() if type(m) is torch.nn.Linear}
    quantized = {n for n, m in rr._core.backbone.named_modules() if isinstance(m, Int8Linear)}
    assert kept == {"layers.0.mlp.down_proj", "layers.1.mlp.down_proj", "layers.1.self_attn.k_proj"}
    # A group with a kept layer is not fused: its other layers are quantized one by one.
    assert {"layers.0.self_attn.fused", "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"} <= quantized
    assert rr.score(FAQ_QUERY, FAQ_DOCS[:3], return_logits=True)


def test_int8_linear_quantizes_each_token_on_its_own_scale():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = Int8Linear(linear, WEIGHT_MAX)
    x = torch.randn(5, 64)
    outlier = torch.cat([x, 1000 * torch.randn(1, 64)])
    with torch.no_grad():
        exact = linear(x)
        got = layer(x)
        beside_outlier = layer(outlier)[:5]
    assert got == pytest.approx(exact, abs=0.05 * exact.abs().max().item())
    # An outlier token in the same call leaves the other tokens' outputs exactly as they were.
    assert torch.equal(beside_outlier, got)
    assert layer(x.reshape(1, 5, 64)).shape == (1, 5, 32)


def test_int8_activations_in_two_digits_are_exact_to_16_bits():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 48, bias=False)
    layer = Int8Linear(linear, WEIGHT_MAX)
    # Heavy tails, like the feed-forward's inner activations, where one int8 digit is coarsest.
    x = torch.randn(7, 256) * torch.randn(7, 256).exp()
    dequantized = layer.weight_t.t().float() * layer.weight_scale[:, None]
    with torch.no_grad():
        got = layer(x)
    exact_activations = x @ dequantized.t()
    one_digit = torch.round(x * (127 / x.abs().amax(1, keepdim=True))) * (x.abs().amax(1, keepdim=True) / 127)
    # Each activation is within amax / (127 * 508) of itself, so only float rounding and that
    # 16-bit remainder separate the layer from a float product with its int8 weights; one digit
    # is some 250 times further off.
    error = (got - exact_activations).abs().max()
    assert error < 1e-3 * exact_activations.abs().max()
    assert (one_digit @ dequantized.t() - exact_activations).abs().max() > 30 * error


def test_a_fused_int8_layer_is_its_layers_side_by_side():
    torch.manual_seed(0)
    q, k = torch.nn.Linear(64, 32, bias=True), torch.nn.Linear(64, 16, bias=False)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        fused = Int8Linear([q, k], WEIGHT_MAX)(x)
        apart = torch.cat([Int8Linear(q, WEIGHT_MAX)(x), Int8Linear(k, WEIGHT_MAX)(x)], dim=-1)
    assert fused.shape == (2, 5, 48)
    assert torch.equal(fused, apart)
    with pytest.raises(ValueError, match="one input size"):
        Int8Linear([q, torch.nn.Linear(32, 8)])


def test_int8_in_the_native_decoder_fuses_projections_and_scores_as_transformers_layers_do(
    int8: Reranker, tiny_model_dir: Path
):
    fused = {n for n, m in int8._core.backbone.named_modules() if isinstance(m, Int8Linear)}
    assert "layers.0.self_attn.fused" in fused and "layers.0.mlp.fused" in fused
    assert "layers.0.self_attn.q_proj" not in fused and "layers.0.mlp.down_proj" in fused
    # transformers' modules are quantized one layer at a time: the same int8 sums, so the same
    # scores (the two decoders agree bitwise in float32).
    apart = Reranker.from_pretrained(tiny_model_dir, device="cpu", dtype="int8", modeling="transformers")
    assert any(
        n.endswith("q_proj") for n, m in apart._core.backbone.named_modules() if isinstance(m, Int8Linear)
    )
    docs = [d for d in FAQ_DOCS if d.strip()]
    # (A fused group joins its digits in int32 only if all its layers can, so rounding may differ.)
    assert int8.score(FAQ_QUERY, docs, return_logits=True) == pytest.approx(
        apart.score(FAQ_QUERY, docs, return_logits=True), abs=2e-4
    )


_NO_VNNI_CHECK = """
import torch
from qwen3_rerank_plugins.backend import Int8Linear
torch.manual_seed(0)
linear = torch.nn.Linear(256, 64, bias=False)
x = torch.randn(32, 256)
layer = Int8Linear(linear, weight_max=63)
rows = x / (x.abs().amax(1, keepdim=True) / 127)
exact = torch.round(rows).double() @ layer.weight_t.double()
got = torch._int_mm(torch.round(rows).to(torch.int8), layer.weight_t).double()
print(float((exact - got).abs().max()))
"""


def test_int8_weights_within_63_do_not_saturate_without_vnni():
    # oneDNN capped to AVX2 (no VNNI) multiplies pairs into 16-bit sums: 7-bit weights keep the
    # int8 product exact there. Run in a fresh process, as oneDNN reads the cap once.
    import os
    import subprocess

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run(
        [sys.executable, "-c", _NO_VNNI_CHECK], env=env, capture_output=True, text=True, check=True
    )
    assert float(out.stdout.strip().splitlines()[-1]) == 0.0


def test_get_reranker_loads_int8_once_and_keys_it_apart(tiny_model_dir):
    a = get_reranker(tiny_model_dir, device="cpu", dtype="int8")
    b = get_reranker(tiny_model_dir, device="cpu", dtype="qint8")
    fp32 = get_reranker(tiny_model_dir, device="cpu", dtype="float32")
    assert a is b and a.quantization == "int8"
    assert not a.shares_model_with(fp32) and fp32.quantization is None


def test_int8_on_a_non_float32_model_is_refused(tiny_model_dir):
    from qwen3_rerank_plugins.backend import quantize_int8

    bf16 = Reranker.from_pretrained(tiny_model_dir, device="cpu", dtype="bfloat16")
    with pytest.raises(ValueError, match="float32 weights on CPU"):
        quantize_int8(bf16._core)


def test_features_are_a_frozen_value():
    cpu = CpuFeatures("AVX2", frozenset(AVX2_EPYC))
    with pytest.raises(AttributeError):
        cpu.capability = "AVX512"  # type: ignore[misc]


def test_an_int8_model_reports_int8_in_health_metrics_and_repr(tiny_model_dir):
    from fastapi.testclient import TestClient

    from qwen3_rerank_plugins.server import create_app

    reranker = Reranker.from_pretrained(tiny_model_dir, device="cpu", dtype="int8")
    assert "dtype='int8'" in repr(reranker)
    with TestClient(create_app(reranker)) as client:
        assert client.get("/health").json()["dtype"] == "int8"
        assert 'dtype="int8"' in client.get("/metrics").text
