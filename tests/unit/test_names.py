"""PatientName search keys and fuzzy query terms (Chinese characters, pinyin, initials)."""

from __future__ import annotations

import pytest

from imaging_gateway.domain.names import fuzzy_terms, group_key, name_search_keys, split_keys


def keys(name: str) -> set[str]:
    return set(split_keys(name_search_keys(name)))


def found(name: str, query: str) -> bool:
    """Fuzzy semantics: every query term is a prefix of one of the name's keys."""
    stored = keys(name)
    terms = fuzzy_terms(query)
    return bool(terms) and all(any(k.startswith(t) for k in stored) for t in terms)


ZHANG_SAN = "Zhang^San=张^三"


@pytest.mark.parametrize(
    "query",
    ["张三", "张", "三", "zhang san", "zhangsan", "ZhangSan", "zhāng sān", "zhang1 san1",
     "zs", "ZS", "Zhang^San", "zha", "san zhang", "=张^三"],
)
def test_zhang_san_is_found_by(query: str) -> None:
    assert found(ZHANG_SAN, query)


@pytest.mark.parametrize("query", ["李四", "li", "zhang si", "zx", "wang", "张四"])
def test_zhang_san_is_not_found_by(query: str) -> None:
    assert not found(ZHANG_SAN, query)


def test_ideographic_group_alone_gives_pinyin() -> None:
    # Only the ideographic group: pinyin comes from the characters.
    name = "=王^小东"
    for query in ("wang xiaodong", "wangxiaodong", "xiao dong", "wxd", "xd", "王小东", "小"):
        assert found(name, query), query


def test_alphabetic_camel_case_and_accents() -> None:
    assert found("Wang^XiaoDong", "xiao")
    assert found("Wang^XiaoDong", "wxd")
    assert found("Müller^Jürgen", "muller jurgen")
    assert found("Müller^Jürgen", "müller")
    assert found("van der Berg^John", "vanderberg")


def test_u_umlaut_pinyin_both_spellings() -> None:
    assert found("=吕^布", "lu bu")
    assert found("=吕^布", "lv bu")
    assert found("=吕^布", "lǚ")


def test_surname_heteronyms() -> None:
    # 单 as a surname reads shan; the usual reading is dan. Both find it.
    assert found("=单^田芳", "shan tianfang")
    assert found("=单^田芳", "dan tian")


def test_phonetic_group_is_indexed() -> None:
    name = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert "=やまだ^たろう" in keys(name)
    assert found(name, "やまだ")
    assert found(name, "山田")


def test_group_keys_for_literal_matching() -> None:
    k = keys("Wang^XiaoDong=王^小东")
    assert {"=wang^xiaodong", "=王^小东"} <= k
    assert group_key("Wang^XiaoDong^^") == "=wang^xiaodong"
    assert group_key(" ^ ") is None
    # Fuzzy tokens never look like group keys.
    assert all("=" not in t for t in k if not t.startswith("="))


def test_no_name() -> None:
    assert name_search_keys(None) is None
    assert name_search_keys("") is None
    assert name_search_keys("^^=^") is None


def test_keys_are_space_free_and_bounded() -> None:
    value = name_search_keys("De La Cruz^Maria Jose^^Dr.=" + "长" * 300)
    assert value is not None
    assert all(" " not in k and 0 < len(k) <= 128 for k in split_keys(value))
    assert found("De La Cruz^Maria Jose", "maria cruz")


def test_fuzzy_terms_normalization() -> None:
    assert fuzzy_terms("  Zhāng^SĀN ") == ["zhang", "san"]
    assert fuzzy_terms("zhang1 san1") == ["zhang", "san"]
    assert fuzzy_terms("zha*") == ["zha"]
    assert fuzzy_terms("张三") == ["张三"]
    assert fuzzy_terms("***") == []
    assert fuzzy_terms("zhang zhang") == ["zhang"]
