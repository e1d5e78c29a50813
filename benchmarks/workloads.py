"""Benchmark workloads W1-W4: deterministic synthetic text shaped like the project's users' data.

The text is generated from seeded phrase pools so every run (and every path in a run) scores
exactly the same inputs without shipping a data set. Lengths follow the workloads' definitions:

* W1: one Chinese FAQ query x short FAQ entries (customer-service chatbot).
* W2: one citizen-hotline ticket x past tickets of 100-400 characters (similar-ticket search).
* W3: several English queries x passages of about 200 tokens (offline batch scoring).
* W4: one query x long documents of about 4k tokens (the truncation path).

Sizes: ``"issue"`` is the full definition (for GPUs); ``"cpu"`` shrinks document counts so a
full run of every path on 2 shared CPU cores stays within minutes (the model card's code reads
about 30-40 prompt tokens per second there); ``"quick"`` is the regression check.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["SIZES", "Request", "Workload", "build_workloads", "latency_request"]


@dataclass
class Request:
    """One rerank call: a query, its candidate documents and the instruction."""

    query: str
    documents: list[str]
    instruction: str | None = None


@dataclass
class Workload:
    """A named list of requests scored at one ``max_length``."""

    name: str
    description: str
    requests: list[Request]
    max_length: int = 8192
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def pairs(self) -> int:
        return sum(len(r.documents) for r in self.requests)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        requests = [Request(**r) for r in data["requests"]]
        return cls(**{**data, "requests": requests})


#: Documents per workload for each size preset (W3: queries x passages; W4: docs, max_length).
SIZES: dict[str, dict[str, Any]] = {
    "issue": {"W1": 20, "W2": 50, "W3": (32, 32), "W4": (8, 8192)},
    "cpu": {"W1": 10, "W2": 6, "W3": (2, 4), "W4": (2, 512)},
    "quick": {"W1": 10, "W2": 6},
}

FAQ_INSTRUCTION = "customer_service_faq"
TICKET_INSTRUCTION = "similar_ticket"

_FAQ_QUERY = "订单还没发货，能查一下吗？"
_FAQ_TOPICS = [
    ("订单发货时间", "付款后48小时内发货，节假日顺延，可在“我的订单”中查看物流。"),
    ("发票申请指南", "在订单详情页点击“申请开票”，填写抬头和税号即可，电子发票1个工作日内发送。"),
    ("退货政策", "签收后7天内可无理由退货，商品需保持完好，运费由买家承担。"),
    ("退款到账时间", "退款将在审核通过后3-7个工作日原路退回。"),
    ("修改收货地址", "订单未发货前可在订单详情中修改地址，已发货请联系快递。"),
    ("优惠券使用规则", "优惠券不可叠加使用，需在有效期内下单，部分特价商品不可用。"),
    ("物流查询", "发货后可在“我的订单-查看物流”中查看实时物流信息。"),
    ("催发货", "如超过48小时未发货，可在订单页点击“催发货”，客服会优先处理。"),
    ("缺货处理", "如商品临时缺货，我们会短信通知并提供退款或等待两种选择。"),
    ("会员积分", "每消费1元累计1积分，积分可在下单时抵扣现金。"),
    ("账户安全", "如发现账户异常登录，请立即修改密码并绑定手机。"),
    ("支付失败", "支付失败请检查银行卡余额或更换支付方式，重复扣款会自动退回。"),
    ("预售商品", "预售商品按页面标注的发货时间发货，定金不退。"),
    ("换货流程", "签收后15天内质量问题可申请换货，上传照片后客服审核。"),
    ("配送范围", "支持全国配送，偏远地区配送时间可能延长2-3天。"),
    ("拆分发货", "同一订单的商品可能从不同仓库分开发货，请留意多个物流单号。"),
    ("取消订单", "未发货的订单可直接取消，已发货订单需拒收或退货。"),
    ("价格保护", "下单后7天内降价可申请价保，差价以优惠券形式返还。"),
    ("开箱验货", "签收时请当面开箱验货，破损请拒收并联系客服。"),
    ("客服工作时间", "在线客服每天9:00-22:00，夜间留言次日优先回复。"),
]

_PLACES = [
    "幸福小区",
    "东门菜市场",
    "实验小学门口",
    "人民路与建设路路口",
    "滨江公园",
    "老城区12号楼",
    "地铁3号线B口",
    "城南工业园",
]
_PROBLEMS = [
    "路灯连续多日不亮，夜间行人摔倒",
    "施工噪音深夜扰民，影响休息",
    "垃圾清运不及时，气味很大",
    "井盖缺失存在安全隐患",
    "占道经营导致交通拥堵",
    "小区停水未提前通知",
    "共享单车乱停放堵塞盲道",
    "油烟直排影响居民生活",
]
_DETAILS = [
    "市民表示已经反映过多次但问题仍未解决。",
    "希望相关部门尽快派人到现场查看处理。",
    "周边老人和孩子较多，存在安全风险。",
    "物业称不归其管理，建议转交街道办。",
    "来电人情绪较为激动，要求三天内给予答复。",
    "现场照片已通过微信上传，请核实。",
    "该问题在雨天尤为严重，积水达到十厘米以上。",
    "附近商户也受到影响，营业额明显下降。",
    "来电人要求回访，联系电话已登记。",
    "上次处理后一周内问题再次出现。",
]

_WORDS = (  # noqa: SIM905
    "system data user network server request memory cache policy update release model search query "
    "document passage result ranking score relevant answer question support service customer order "
    "refund return shipping invoice account password security payment delivery storage backup cluster "
    "latency throughput batch token context window training inference accuracy quality evaluation metric "
    "the a of to in and for with on by from that this is are was were be can will should may must not "
    "when where which while after before during between across under over about into through"
).split()
_EN_QUERIES = [
    "How do I reset my account password after a security update?",
    "What is the refund policy for orders returned after delivery?",
    "How can I reduce inference latency for batch requests on the server?",
    "Which storage backup settings keep the cluster data safe?",
]


def _english_text(rng: random.Random, words: int) -> str:
    sentences = []
    count = 0
    while count < words:
        n = rng.randint(8, 18)
        sentence = " ".join(rng.choice(_WORDS) for _ in range(n))
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
        count += n
    return " ".join(sentences)


def _ticket(rng: random.Random, min_chars: int, max_chars: int) -> str:
    target = rng.randint(min_chars, max_chars)
    text = f"{rng.choice(_PLACES)}{rng.choice(_PROBLEMS)}。"
    while len(text) < target:
        text += rng.choice(_DETAILS)
    return text[:target]


def _w1(n: int) -> Workload:
    docs = [f"[FAQ] {title}：{answer}" for title, answer in _FAQ_TOPICS]
    docs = (docs * (n // len(docs) + 1))[:n]
    return Workload(
        "W1",
        f"1 Chinese FAQ query x {n} short FAQ entries",
        [Request(_FAQ_QUERY, docs, FAQ_INSTRUCTION)],
    )


def _w2(rng: random.Random, n: int) -> Workload:
    query = _ticket(rng, 120, 200)
    docs = [_ticket(rng, 100, 400) for _ in range(n)]
    return Workload(
        "W2",
        f"1 hotline ticket x {n} past tickets of 100-400 characters",
        [Request(query, docs, TICKET_INSTRUCTION)],
    )


def _w3(rng: random.Random, queries: int, passages: int) -> Workload:
    requests = [
        Request(
            _EN_QUERIES[i % len(_EN_QUERIES)] + ("" if i < len(_EN_QUERIES) else f" (case {i})"),
            [_english_text(rng, 170) for _ in range(passages)],
        )
        for i in range(queries)
    ]
    return Workload("W3", f"{queries} English queries x {passages} passages of ~200 tokens", requests)


def _w4(rng: random.Random, docs: int, max_length: int) -> Workload:
    long_docs = [
        _english_text(rng, 2800) + " " + "".join(_ticket(rng, 300, 400) for _ in range(4))
        for _ in range(docs)
    ]
    return Workload(
        "W4",
        f"1 query x {docs} documents of ~4k tokens, truncated to max_length={max_length}",
        [Request(_EN_QUERIES[0], long_docs)],
        max_length=max_length,
    )


def build_workloads(size: str = "cpu", names: list[str] | None = None, seed: int = 0) -> list[Workload]:
    """The workloads of a size preset (see :data:`SIZES`), in order W1..W4.

    Args:
        size: ``"issue"``, ``"cpu"`` or ``"quick"``.
        names: Keep only these workloads (e.g. ``["W1", "W2"]``).
        seed: Seed of the synthetic text.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    sizes = SIZES[size]
    rng = random.Random(seed)
    builders = {
        "W1": lambda: _w1(sizes["W1"]),
        "W2": lambda: _w2(rng, sizes["W2"]),
        "W3": lambda: _w3(rng, *sizes["W3"]),
        "W4": lambda: _w4(rng, *sizes["W4"]),
    }
    wanted = names or list(sizes)
    unknown = [n for n in wanted if n not in sizes]
    if unknown:
        raise ValueError(f"workloads {unknown} are not in size {size!r} (has {list(sizes)})")
    return [builders[name]() for name in builders if name in wanted]


def latency_request() -> Request:
    """The 10-document request whose latency is reported (W1's query and first 10 entries)."""
    return _w1(10).requests[0]
