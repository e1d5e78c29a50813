"""Quick trial: rerank a Chinese FAQ query and an English query, print the ranked lists.

Run:
    pip install torch==2.13.0 -e ".[demo]" && python examples/quickstart.py
    python examples/quickstart.py --model /path/to/Qwen3-Reranker-0.6B     # a local copy
    python examples/quickstart.py --model Qwen/Qwen3-Reranker-4B --device cuda
    python examples/quickstart.py --demo                                    # offline, no hub call

By default it loads ``Qwen/Qwen3-Reranker-0.6B`` (Hugging Face, then ModelScope). When no model
hub can be reached it says so and runs on a tiny demo model built locally with random weights
(so does ``--demo``): the ranking machinery is real, the scores are meaningless.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from _common import add_model_options, demo_reminder, load_reranker

from qwen3_rerank_plugins import Reranker

FAQ_QUERY = "订单还没发货，能查一下吗？"
FAQ_DOCS = [
    "[FAQ] 发票怎么开：在订单详情页点击“申请开票”，填写抬头和税号，电子发票1个工作日内发送到邮箱。",
    "[FAQ] 订单发货查询：付款后48小时内发货。进入“我的订单”，点击订单即可查看物流单号和配送进度。",
    "[Policy] 退货政策：签收后7天内可申请无理由退货，商品及包装需保持完好。",
    "【优惠券使用说明】优惠券需在有效期内使用，部分特价商品不可叠加。",
    "[FAQ] 修改收货地址：订单未发货前，可在订单详情页修改收货地址；已发货订单请联系客服。",
]
EN_QUERY = "my coupon doesn't work"
EN_DOCS = [
    "[FAQ] Coupons: a coupon applies only before its expiry date and not to items already on sale.",
    "[Policy] Refunds are issued to the original payment method within 7 business days.",
    "[FAQ] To track an order, open My Orders and select the order to see the courier's tracking number.",
    "[Announcement] Our stores will close early on public holidays.",
]


def show(reranker: Reranker, query: str, docs: list[str], instruction: str | None) -> None:
    start = time.perf_counter()
    results = reranker.rerank(query, docs, instruction=instruction)
    elapsed = (time.perf_counter() - start) * 1000
    print(f"Query: {query}   (instruction: {instruction or 'default'}, {elapsed:.0f} ms)")
    for rank, r in enumerate(results, 1):
        print(f"  {rank}. {r.score:.4f} [{r.band:<6}] {r.text}")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    reranker, is_demo = load_reranker(args)
    print(f"Using {reranker!r}\n")
    show(reranker, FAQ_QUERY, FAQ_DOCS, "customer_service_faq")
    show(reranker, EN_QUERY, EN_DOCS, None)
    demo_reminder(is_demo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
