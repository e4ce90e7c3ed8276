"""PML parser and position layout: offsets, union/parameter rules, located errors, fuzzing."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlsys24.promptcache import ROOT, ParseError, layout, parse_prompt, parse_schema

SCHEMA = """<schema name="s">
<system>Hi.</system>
<module name="a">alpha </module>
<union scaffold="u2">
  <module name="u1">one</module>
  <module name="u2">second<module name="deep">!</module></module>
</union>
<module name="t">x<parameter name="p" length="5" scaffold="ab"/>y</module>
</schema>"""


def test_layout_offsets():
    lay = layout(SCHEMA)
    m = lay.modules
    sys_len = len("# system: Hi.\n")
    assert m["a"].start == sys_len and m["a"].length == len("alpha ")
    assert m["u1"].start == m["u2"].start == m["a"].end  # union members share their start
    assert m["deep"].start == m["u2"].start + len("second")
    union_len = max(m["u1"].length, m["u2"].length)
    assert m["t"].start == m["u1"].start + union_len  # union length = max member length
    slot = next(s for s in lay.segments if s.kind == "param")
    assert slot.length == 5 and slot.start == m["t"].start + 1  # parameter reserves exactly `length`
    assert lay.length == m["t"].end == m[ROOT].end


def test_prompt_positions_and_args():
    lay = layout(SCHEMA)
    sel = lay.resolve('<prompt schema="s"><a/><u2><deep/></u2><t p="ok"/>Why?</prompt>')
    assert sel.modules == [ROOT, "a", "u2", "deep", "t"]
    slot = next(s for s in lay.segments if s.kind == "param")
    assert sel.uncached_pos[:2] == [slot.start, slot.start + 1]  # argument: first k slot positions
    assert sel.uncached_pos[2:] == list(range(lay.length, lay.length + 4))  # user text at len(schema)
    ids, pos = sel.full_sequence(lay)
    assert len(ids) == len(pos) and pos == sorted(pos)


@pytest.mark.parametrize("prompt, where, needle", [
    ('<prompt schema="s"><u1/><u2/>q</prompt>', (1, 25), "same union"),
    ('<prompt schema="s"><nope/>q</prompt>', (1, 20), "not a module"),
    ('<prompt schema="s"><deep/>q</prompt>', (1, 20), "not a module"),
    ('<prompt schema="s"><t p="too long!"/>q</prompt>', (1, 20), "slot holds 5"),
    ('<prompt schema="s"><t z="1"/>q</prompt>', (1, 20), "no parameter"),
    ('<prompt schema="x">q</prompt>', (1, 1), "schema"),
    ('<prompt schema="s"><a/><a/>q</prompt>', (1, 24), "twice"),
])
def test_prompt_errors_are_located(prompt, where, needle):
    with pytest.raises(ParseError) as e:
        layout(SCHEMA).resolve(prompt)
    assert (e.value.line, e.value.col) == where and needle in str(e.value)


@pytest.mark.parametrize("src, where, expected", [
    ('<schema name="a">\n  <module name="m">x</modul>\n</schema>', (2, 23), "</module>"),
    ('<schema name="a"><module>x</module></schema>', (1, 18), "name attribute"),
    ('<schema name="a"><union><module name="m">x</module>t</union></schema>', (1, 52), "<module>"),
    ('<schema name="a"><module name="m"><parameter name="p" length="0"/></module></schema>', (1, 35), "N >= 1"),
    ('<schema name="a"><parameter name="p" length="2"/></schema>', (1, 18), "inside a <module>"),
    ('<schema name="a"><module name="m">a & b</module></schema>', (1, 37), "entity"),
    ('<schema name="a"><module name="m">x</module><module name="m">y</module></schema>', (1, 45), "unique"),
    ('<schema name="a">\n<bogus/></schema>', (2, 1), "<module>"),
    ('<schema name="a"><union scaffold="z"><module name="m">x</module></union></schema>', (1, 18), "one of m"),
    ('<schema name="a"', (1, 17), "'>'"),
    ('', (1, 1), "root element"),
])
def test_schema_errors_are_located(src, where, expected):
    with pytest.raises(ParseError) as e:
        parse_schema(src)
    assert (e.value.line, e.value.col) == where, str(e.value)
    assert expected in (e.value.expected or "")


def test_entities_and_roles():
    s = parse_schema('<schema name="a"><module name="m">a &lt;b&gt; &amp; &#65;</module><user>u</user></schema>')
    lay = layout(s)
    text = "".join(lay.tokenizer.decode(seg.ids) for seg in lay.segments)
    assert "a <b> & A" in text and "# user: u\n" in text
    p = parse_prompt('<prompt schema="a"><m/><user>hello</user></prompt>')
    assert p.user_text == "# user: hello\n"


PML_ALPHABET = st.sampled_from(list('<>/="\' &;#!?-abmnxyz0123456789\n\t') + [
    "<schema", "</schema>", "<module", "</module>", "<union", "</union>", "<parameter", "name=", "length=",
    "scaffold=", "cache=", "<!--", "-->", "&amp;", "&#x41;", "<system>", "</system>", "<prompt", "</prompt>",
    ' name="m"', ' length="3"', "/>", "\u00e9", "\ud7ff"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(PML_ALPHABET, max_size=40).map("".join))
def test_fuzz_parser_only_raises_parse_error(src):
    for fn in (parse_schema, parse_prompt):
        try:
            fn(src)
        except ParseError as e:
            assert e.line >= 1 and e.col >= 1


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_arbitrary_text(src):
    for fn in (parse_schema, parse_prompt):
        try:
            fn(src)
        except ParseError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_fuzz_prompts_against_schema(body):
    lay = layout(SCHEMA)
    try:
        lay.resolve('<prompt schema="s">' + body + "</prompt>")
    except ParseError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.integers(0, len(SCHEMA)))
def test_truncated_schema_errors(n):
    try:
        parse_schema(SCHEMA[:n])
    except ParseError as e:
        assert e.line >= 1
