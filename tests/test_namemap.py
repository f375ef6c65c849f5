"""Name maps: exact and regex rules, dotted prefixes, ignore lists, bad files."""

from __future__ import annotations

import pytest

from nestalign.namemap import NameMap, NameMapError


def test_exact_regex_and_prefix_rules(tmp_path):
    spec = tmp_path / "map.yaml"
    spec.write_text(
        "exact:\n  enc.pre: encoder.pre_encode\n"
        "regex:\n  - ['enc\\.layers\\.(\\d+)', 'encoder.layers.\\1']\n"
        "ignore:\n  - 'probe(\\..*)?'\n"
    )
    nmap = NameMap.load(spec)
    assert nmap.map("enc.pre") == "encoder.pre_encode"
    assert nmap.map("enc.pre.conv.0.weight") == "encoder.pre_encode.conv.0.weight"
    assert nmap.map("enc.layers.3.norm.bias") == "encoder.layers.3.norm.bias"
    assert nmap.map("decoder.weight") == "decoder.weight"  # no rule: unchanged
    assert nmap.map("xenc.layers.3") == "xenc.layers.3"  # rules match whole dotted parts
    assert nmap.ignored("probe.weight") and not nmap.ignored("encoder.probe")
    assert NameMap.load(spec).to_dict()["regex"] == [[r"enc\.layers\.(\d+)", r"encoder.layers.\1"]]


def test_exact_rule_wins_over_regex():
    nmap = NameMap(exact={"a.b": "x"}, regex=[(r"a\.(.*)", r"y.\1")])
    assert nmap.map("a.b.w") == "x.w"
    assert nmap.map("a.c.w") == "y.c.w"


@pytest.mark.parametrize(
    "text, message",
    [
        ("exact: [1, 2]\n", "exact"),
        ("regex:\n  - ['(', 'x']\n", "regular expression"),
        ("regex:\n  - 'a'\n", "pattern, replacement"),
        ("rename: {}\n", "keys"),
        ("exact: {a: [\n", "cannot read"),
    ],
)
def test_bad_files_name_the_file(tmp_path, text, message):
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    with pytest.raises(NameMapError, match=message) as info:
        NameMap.load(spec)
    assert "bad.yaml" in str(info.value)
