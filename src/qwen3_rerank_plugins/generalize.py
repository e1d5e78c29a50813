"""The default query rewrite of the low-confidence fallback: remove a query's specifics.

A hotline ticket such as "朝阳区建国路88号3号楼电梯昨晚十一点又坏了，张女士被困二十分钟" carries
an address, a time, numbers and a name that no past ticket shares. :func:`generalize` deletes
them by rule (Chinese and English, no dependencies) so that similar cases can match; the
orchestration (when to retry, which attempt to keep) is :mod:`qwen3_rerank_plugins.fallback`.

Example:
    >>> generalize("朝阳区建国路88号3号楼电梯昨晚十一点又坏了")
    '电梯又坏了'
    >>> generalize("My order #48213 from March 3rd hasn't arrived at 12 Baker Street")
    "My order hasn't arrived"
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["Generalizer", "generalize"]

#: A query rewriter: takes the query, returns a more general one (the same text means "no rewrite").
Generalizer = Callable[[str], str]

# ---------------------------------------------------------------------------------------------
# The default rule-based generalizer
# ---------------------------------------------------------------------------------------------

_MARK = "\x00"  # stands where something was removed, until the clean-up pass
_CJK = r"\u3400-\u4dbf\u4e00-\u9fff"
_HAN_DIGIT = "零〇一二两三四五六七八九十百千万"

# Characters that never belong to a place name; they keep "我要投诉小区物业" from being read as
# the district "我要投诉小区".
_NOT_NAME = (
    "的了在是我你他她它们这那和与及或也都还就不没很太被把给对向从到于为个些有"
    "要会能可说想让叫请吗呢吧啊呀又再已"
)
_PLACE_CHAR = f"[{_CJK}](?<![{_NOT_NAME}])"
# Administrative and street suffixes, each guarded against the everyday words that end the same
# way (小区, 社区, 超市, 城市, 马路, 线路, 农村, ...).
_PLACE_SUFFIX = (
    r"(?:自治区|特别行政区|街道|大街|大道|胡同"
    r"|(?<![小社园景校城市郊山地辖片街商厂病误专营])区"
    r"|(?<![超城菜夜门股上早闹集黑都])市"
    r"|(?<![节反])省|县"
    r"|(?<![农乡山渔])村|(?<![城乡集])镇|(?<![家老城故下])乡"
    r"|(?<![马道公线电网出走一铁水套思迷让带赶修开退半绕近小街区市县省镇乡村])路"
    r"|(?<![逛上沿])街|巷|弄)"
)
# A street directly after a place ("中关村大街") belongs to it.
_CN_PLACE = re.compile(f"(?:{_PLACE_CHAR}){{2,5}}?{_PLACE_SUFFIX}(?:[东西南北中]?(?:大街|大道|街道))?")

_SURNAMES = (
    "王李张刘陈杨赵黄周吴徐孙胡朱高林何郭马罗梁宋郑谢韩唐冯于董萧程曹袁邓许傅沈曾彭吕苏卢蒋蔡贾丁"
    "魏薛叶阎余潘杜戴夏钟汪田任姜范方石姚谭廖邹熊金陆郝孔白崔康毛邱秦江史顾侯邵孟龙万段雷钱汤尹黎"
    "易常武乔贺赖龚文"
)
_CN_NAMES = [
    re.compile(f"[{_SURNAMES}][{_CJK}]?(?:先生|女士|小姐|师傅|老师|经理|阿姨|大爷|大妈|大姐|同志)"),
    re.compile(f"[老小][{_SURNAMES}](?![{_CJK}]*?[区路街])"),
    re.compile(f"(?:我叫|名叫|本人叫)[{_CJK}]{{2,3}}"),
    re.compile(f"(?:我姓|本人姓)[{_CJK}]"),
]

# The look-behinds make a match start at the first digit of a run, never inside it: without them
# a long digit run is rescanned from every position (quadratic time on hostile input).
_CN_NUM = rf"(?:(?<![0-9０-９])[0-9０-９]+(?:[.:：][0-9０-９]+)*|(?<![{_HAN_DIGIT}])[{_HAN_DIGIT}]+)"
_CN_DATES = [
    re.compile(rf"{_CN_NUM}年(?:{_CN_NUM}月(?:{_CN_NUM}[日号])?)?"),
    re.compile(rf"{_CN_NUM}月(?:份|{_CN_NUM}[日号])?"),
    re.compile(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}"),
    re.compile(
        r"(?:大前天|前天|昨天|今天|明天|后天|昨日|今日|昨晚|今晚|昨夜|今早|今晨|前几天|这几天|上个?月|这个?月|本月|下个?月"
        r"|去年|今年|明年|(?:上|本|这|下)个?(?:周|星期|礼拜)[一二三四五六日天]?)"
    ),
    re.compile(r"(?:周|星期|礼拜)[一二三四五六日天]"),
]
_CN_TIMES = [
    re.compile(
        rf"(?:早上|上午|中午|下午|傍晚|晚上|夜里|夜间|半夜|深夜|凌晨)?{_CN_NUM}[点時时](?:{_CN_NUM}分?|半|整)?"
        r"(?:以后|之后|以前|之前|左右|后|前)?"
    ),
    re.compile(r"(?:早上|上午|中午|下午|傍晚|晚上|夜里|夜间|半夜|深夜|凌晨)(?:以后|之后|后)?"),
    re.compile(r"\d{1,2}[:：]\d{2}"),
]
_CN_UNITS = (
    "分钟|小时|个小时|天|日|周|个星期|星期|个月|年|次|度|元|块钱|块|毛|米|公里|平米|平方米|号楼|号院|号|栋|幢|"
    "单元|室|层|楼|户|人|位|辆|岁|件|单|多"
)
_EN_UNITS = r"minutes?|hours?|days?|weeks?|months?|years?|times|euros?|dollars?|yuan|km|kg|degrees?"
_CN_NUMBERS = [
    # Digits, with the unit they count: "3号楼", "16度", "48小时", "1201室", "20 minutes", "$25".
    re.compile(
        rf"第?[#＃$¥￥€£]?(?<![0-9０-９])[0-9０-９]+(?:[.,:：/-][0-9０-９]+)*(?:{_CN_UNITS}|\s+(?:{_EN_UNITS})\b)?",
        re.IGNORECASE,
    ),
    # Chinese numerals only with a unit, or two or more of them: "二十分钟", "三次", "二十" but not
    # the 一 of "查一下" or "一直".
    re.compile(rf"第?(?<![{_HAN_DIGIT}])[{_HAN_DIGIT}]+(?:{_CN_UNITS})"),
    re.compile(rf"(?<![{_HAN_DIGIT}])(?!万一|千万|一一)[{_HAN_DIGIT}]{{2,}}"),
]

_MONTHS = (
    r"(?:January|February|March|April|May|June|July|August|September|October|November|December"
    r"|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec)\.?"
)
_WEEKDAYS = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)s?"
_ORDINAL = r"\d{1,2}(?:st|nd|rd|th)?"
_STREET = (
    r"(?:Street|St|Road|Rd|Avenue|Ave|Boulevard|Blvd|Lane|Ln|Drive|Dr|Way|Court|Ct|Place|Pl|Terrace"
    r"|Highway|Hwy|Square|Sq)\b\.?"
)
_EN_NAMES = [
    re.compile(r"\b(?:Mr|Mrs|Ms|Miss|Dr|Prof)\b\.?\s+[A-Z][a-z]+(?:\s+[A-Z][a-z]+)?"),
    re.compile(r"\b[Mm]y name is\s+[A-Z][a-z]+(?:\s+[A-Z][a-z]+)?"),
]
_EN_ADDRESSES = [
    re.compile(rf"\b\d+[A-Za-z]?,?\s+(?:[A-Z][a-z]+\s+){{1,3}}{_STREET}"),
    re.compile(rf"\b(?:[A-Z][a-z]+\s+){{1,3}}{_STREET}"),
    re.compile(r"\b(?:Apt|Apartment|Suite|Unit|Room|Flat|Floor)\b\.?\s*#?\s*[0-9A-Za-z-]*\d[0-9A-Za-z-]*"),
]
_EN_DATES = [
    re.compile(rf"\b{_MONTHS}\s+{_ORDINAL}(?:,?\s+\d{{4}})?\b", re.IGNORECASE),
    re.compile(rf"\b{_ORDINAL}\s+(?:of\s+)?{_MONTHS}(?:,?\s+\d{{4}})?\b", re.IGNORECASE),
    re.compile(rf"\b{_MONTHS}(?:\s+\d{{4}})?(?=[\s,.;!?]|$)"),
    re.compile(r"\b\d{4}-\d{1,2}-\d{1,2}\b|\b\d{1,2}/\d{1,2}(?:/\d{2,4})?\b"),
    re.compile(
        rf"\b(?:(?:last|this|next|on)\s+)?(?:{_WEEKDAYS}|weekend|week|month|year)"
        r"(?:\s+(?:morning|afternoon|evening|night))?\b(?<!\bweek)(?<!\bmonth)(?<!\byear)",
        re.IGNORECASE,
    ),
    re.compile(
        r"\b(?:(?:last|this|next)\s+(?:week|month|year|night|morning|afternoon|evening)"
        r"|yesterday(?:\s+(?:morning|afternoon|evening))?|today|tonight|tomorrow"
        r"|(?:this|tomorrow)\s+(?:morning|afternoon|evening))\b",
        re.IGNORECASE,
    ),
]
_EN_TIMES = [
    re.compile(r"\b\d{1,2}(?::\d{2})?\s*(?:a\.m\.|p\.m\.|am\b|pm\b)", re.IGNORECASE),
    re.compile(r"\b\d{1,2}:\d{2}\b|\b\d{1,2}\s+o'clock\b|\b(?:noon|midnight)\b", re.IGNORECASE),
]
# Codes that mix letters and digits: order and ticket numbers ("A123456", "SN-4471").
_EN_CODES = re.compile(r"#?\b[A-Za-z]+-?\d[0-9A-Za-z-]*\b")

#: Rule groups in the order they run: names and addresses before the numbers inside them.
_RULES: tuple[re.Pattern[str], ...] = (
    *_CN_NAMES,
    *_EN_NAMES,
    *_EN_ADDRESSES,
    *_EN_DATES,
    *_EN_TIMES,
    _CN_PLACE,
    *_CN_DATES,
    *_CN_TIMES,
    _EN_CODES,
    *_CN_NUMBERS,
)

# Clean-up: prepositions and particles left dangling by a removal, then spacing and punctuation.
_CN_DANGLING = re.compile(f"(?:家住|住在|位于|在于|在|于|从|到|至|自)?{_MARK}+(?:的|之)?")
_EN_DANGLING = re.compile(
    rf"\b(?:at|on|in|from|since|until|near|by|around|of|for|before|after|about)\s*{_MARK}(?:[\s,]*{_MARK})*",
    re.IGNORECASE,
)
_SPACE_BETWEEN_CJK = re.compile(rf"(?<=[{_CJK}，。、；：！？）】」]) +(?=[{_CJK}，。、；：！？（【「])")
_SPACE_BEFORE_PUNCT = re.compile(r"(?<!\s)\s+(?=[,.;:!?，。、；：！？])")
_REPEATED_PUNCT = re.compile(r"([,;，、；])(?:\s*[,;，、；])+")
_DOUBLED_PARTICLE = re.compile(r"([了的])\1+")  # "丢了三天了" -> "丢了了" -> "丢了"
_LEADING = re.compile(r"^[\s,.;:，。、；：]+")
_TRAILING_COMMA = re.compile(r"(?<![\s,;:，、；：])[\s,;:，、；：]+$")


def generalize(query: str) -> str:
    """Rewrite a query more generally by removing its specifics (rule-based, Chinese and English).

    What it removes:

    * **addresses**: Chinese place names ending in 省/市/区/县/镇/乡/村/街道/路/街/大道/巷/胡同
      ("朝阳区", "建国路88号"), house numbers ("3号楼", "1201室"); English street addresses
      ("12 Baker Street", "Main St."), "Apt 4B", "Room 1201";
    * **dates and times**: "2024年3月5日", "3月5号", "昨天", "上周三", "晚上十一点后", "23:00";
      "March 3rd, 2024", "2024-03-05", "last Monday", "yesterday", "10:30 pm";
    * **numbers**: digits with the unit they count ("二十分钟", "16度", "48小时", "3 days"),
      order and ticket numbers ("#48213", "A123456"), amounts ("$25", "¥99");
    * **names** that carry a cue: "张女士", "王先生", "老李", "我叫王小明"; "Mr. Smith",
      "my name is Anna Lee";

    then drops the prepositions and particles a removal leaves dangling ("在", "的", "at", "on")
    and tidies spaces and punctuation.

    What it does not do: recognise bare person names ("张伟说"), place names without a suffix
    ("望京", "Shanghai"), shop, company or compound names ("阳光花园"), or rephrase anything; it
    only deletes. Product codes with digits ("iPhone 15") are removed like any other number. Pass
    your own callable (an LLM rewrite, a NER model) to :func:`rerank_with_fallback` for more.

    Args:
        query: The query or ticket text.

    Returns:
        The query with its specifics removed; the query itself (stripped) when nothing would be
        left.

    Raises:
        TypeError: If ``query`` is not a string.

    Example:
        >>> generalize("张女士反映：海淀区中关村大街路灯上周三开始不亮")
        '反映：路灯开始不亮'
    """
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    text = query
    for rule in _RULES:
        text = rule.sub(_MARK, text)
    text = _EN_DANGLING.sub(_MARK, text)
    text = _CN_DANGLING.sub(" ", text)
    text = _SPACE_BETWEEN_CJK.sub("", text)
    text = _SPACE_BEFORE_PUNCT.sub("", text)
    text = _REPEATED_PUNCT.sub(r"\1", text)
    text = _DOUBLED_PARTICLE.sub(r"\1", text)
    text = re.sub(r"\s+", " ", text)
    text = _TRAILING_COMMA.sub("", _LEADING.sub("", text)).strip()
    return text or query.strip()
