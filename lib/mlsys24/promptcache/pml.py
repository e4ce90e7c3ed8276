"""PML, the Prompt Markup Language of Prompt Cache (Gim et al., MLSys 2024), parsed into a tree.

A *schema* declares reusable prompt modules::

    <schema name="qa">
      <system>You answer questions about code.</system>
      <module name="doc-a">...text...</module>
      <union scaffold="expert">
        <module name="novice">...</module>
        <module name="expert">...</module>
      </union>
      <module name="task">Summarise in <parameter name="words" length="8"/> words.</module>
    </schema>

- ``<module name=.. [cache="false"]>``: a reusable span (modules nest);
- ``<union [scaffold=member]>``: exactly one member module is chosen per prompt; all members share
  their start position;
- ``<parameter name=.. length=L [scaffold=text]>``: a slot of ``L`` positions filled per request;
- ``<system>``, ``<user>``, ``<assistant>``: role helpers, replaced by model-specific text
  (:data:`CHAT_TEMPLATES`).

A *prompt* imports modules by tag name, passes parameter values as attributes and appends free text
(never cached)::

    <prompt schema="qa"><doc-a/><expert/><task words="three"/>What does f return?</prompt>

Every malformed input raises :class:`ParseError` with the 1-based line and column and what was
expected there; the parser never raises anything else (fuzzed in ``tests/promptcache``). The parser
is self-contained (no ``xml.etree``), so semantic errors — an unknown tag, a union member that is not
a module, two members of one union imported together — carry the location of the offending tag too.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

__all__ = [
    "ParseError", "Text", "Parameter", "Module", "Union", "Schema", "Import", "Prompt", "CHAT_TEMPLATES",
    "parse_schema", "parse_prompt", "escape",
]

#: Role helper tags -> (prefix, suffix) text; "plain" suits the byte-level workbench model,
#: "llama2" is Llama-2-chat's format.
CHAT_TEMPLATES: dict[str, dict[str, tuple[str, str]]] = {
    "plain": {"system": ("# system: ", "\n"), "user": ("# user: ", "\n"), "assistant": ("# assistant: ", "\n")},
    "llama2": {"system": ("<<SYS>>\n", "\n<</SYS>>\n\n"), "user": ("[INST] ", " [/INST]"), "assistant": ("", "")},
}
ROLE_TAGS = ("system", "user", "assistant")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'"}


class ParseError(ValueError):
    """Malformed PML. ``line``/``col`` are 1-based; ``expected`` says what would have been valid."""

    def __init__(self, message: str, line: int, col: int, expected: str | None = None):
        self.message, self.line, self.col, self.expected = message, line, col, expected
        where = f"line {line}, column {col}"
        super().__init__(f"{where}: {message}" + (f" (expected {expected})" if expected else ""))


def escape(text: str) -> str:
    """Text -> PML character data (``&``, ``<``, ``>`` escaped)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ------------------------------------------------------------------------------------------------
# Generic element tree with source locations
@dataclass
class _Node:
    tag: str
    attrs: dict[str, str]
    children: list  # of _Node | _Chars
    line: int
    col: int


@dataclass
class _Chars:
    text: str
    line: int
    col: int


class _Reader:
    def __init__(self, src: str):
        if not isinstance(src, str):
            raise ParseError(f"PML source must be str, got {type(src).__name__}", 1, 1, "a string")
        self.s, self.i = src, 0
        self._starts = [0] + [m.end() for m in re.finditer("\n", src)]

    def loc(self, i: int | None = None) -> tuple[int, int]:
        i = self.i if i is None else i
        ln = bisect.bisect_right(self._starts, i) - 1
        return ln + 1, i - self._starts[ln] + 1

    def error(self, msg: str, expected: str | None = None, at: int | None = None) -> ParseError:
        return ParseError(msg, *self.loc(at), expected)

    def peek(self, n: int = 1) -> str:
        return self.s[self.i:self.i + n]

    def skip_ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
            self.i += 1

    def expect(self, lit: str, what: str | None = None) -> None:
        if not self.s.startswith(lit, self.i):
            got = self.s[self.i:self.i + 1]
            raise self.error(f"found {got!r}" if got else "unexpected end of input", what or repr(lit))
        self.i += len(lit)

    def name(self, what: str) -> str:
        m = _NAME.match(self.s, self.i)
        if not m:
            got = self.s[self.i:self.i + 1]
            raise self.error(f"found {got!r}" if got else "unexpected end of input", what)
        self.i = m.end()
        return m.group(0)

    def skip_misc(self) -> None:
        """Whitespace, comments and an XML declaration between elements."""
        while True:
            self.skip_ws()
            if self.s.startswith("<!--", self.i):
                self.comment()
            elif self.s.startswith("<?", self.i):
                end = self.s.find("?>", self.i + 2)
                if end < 0:
                    raise self.error("unterminated processing instruction", "'?>'")
                self.i = end + 2
            else:
                return

    def comment(self) -> None:
        start = self.i
        end = self.s.find("-->", self.i + 4)
        if end < 0:
            raise self.error("unterminated comment", "'-->'", at=start)
        self.i = end + 3

    def chars(self, until: int) -> str:
        """Decode character data s[i:until] (entities), advancing i."""
        out, j = [], self.i
        while j < until:
            amp = self.s.find("&", j, until)
            if amp < 0:
                out.append(self.s[j:until])
                break
            out.append(self.s[j:amp])
            semi = self.s.find(";", amp, min(until, amp + 12))
            ent = self.s[amp + 1:semi] if semi > 0 else ""
            if ent in _ENTITIES:
                out.append(_ENTITIES[ent])
            elif re.fullmatch(r"#[0-9]{1,7}|#x[0-9A-Fa-f]{1,6}", ent or "-"):
                code = int(ent[2:], 16) if ent[1] == "x" else int(ent[1:])
                if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                    raise self.error(f"invalid character reference &{ent};", "a valid code point", at=amp)
                out.append(chr(code))
            else:
                raise self.error("bare '&' in text", "an entity such as &amp; &lt; &gt; &quot; &apos;", at=amp)
            j = semi + 1
        self.i = until
        return "".join(out)

    def element(self) -> _Node:
        line, col = self.loc()
        self.expect("<", "'<' (an element)")
        tag = self.name("a tag name")
        attrs: dict[str, str] = {}
        while True:
            had_ws = self.i < len(self.s) and self.s[self.i] in " \t\r\n"
            self.skip_ws()
            if self.s.startswith("/>", self.i):
                self.i += 2
                return _Node(tag, attrs, [], line, col)
            if self.s.startswith(">", self.i):
                self.i += 1
                break
            if not had_ws:
                got = self.peek()
                raise self.error(f"found {got!r}" if got else "unexpected end of input",
                                 f"whitespace, '>' or '/>' in <{tag}>")
            at = self.i
            key = self.name(f"an attribute name, '>' or '/>' in <{tag}>")
            if key in attrs:
                raise self.error(f"duplicate attribute {key!r} in <{tag}>", "each attribute once", at=at)
            self.skip_ws()
            self.expect("=", f"'=' after attribute {key!r}")
            self.skip_ws()
            q = self.peek()
            if q not in ('"', "'"):
                raise self.error(f"found {q!r}" if q else "unexpected end of input",
                                 f"a quoted value for attribute {key!r}")
            end = self.s.find(q, self.i + 1)
            if end < 0:
                raise self.error(f"unterminated value of attribute {key!r}", f"closing {q}")
            if "<" in self.s[self.i + 1:end]:
                raise self.error(f"'<' inside the value of attribute {key!r}", "&lt;",
                                 at=self.s.index("<", self.i + 1))
            self.i += 1
            attrs[key] = self.chars(end)
            self.i = end + 1
        children: list = []
        while True:
            lt = self.s.find("<", self.i)
            if lt < 0:
                raise self.error(f"unexpected end of input inside <{tag}> opened at line {line}, column {col}",
                                 f"</{tag}>", at=len(self.s))
            if lt > self.i:
                cl, cc = self.loc()
                children.append(_Chars(self.chars(lt), cl, cc))
            if self.s.startswith("</", self.i):
                self.i += 2
                at = self.i
                close = self.name(f"</{tag}>")
                if close != tag:
                    raise self.error(f"closing tag </{close}> does not match <{tag}> opened at line {line}, "
                                     f"column {col}", f"</{tag}>", at=at)
                self.skip_ws()
                self.expect(">", f"'>' to end </{tag}>")
                return _Node(tag, attrs, children, line, col)
            if self.s.startswith("<!--", self.i):
                self.comment()
                continue
            children.append(self.element())


def _parse_tree(src: str) -> _Node:
    r = _Reader(src)
    r.skip_misc()
    if r.i >= len(r.s):
        raise r.error("empty document", "a root element")
    root = r.element()
    r.skip_misc()
    if r.i < len(r.s):
        raise r.error("content after the root element", "end of input")
    return root


# ------------------------------------------------------------------------------------------------
# Schema AST
@dataclass
class Text:
    text: str
    line: int = 0
    col: int = 0


@dataclass
class Parameter:
    name: str
    length: int
    scaffold: str | None = None
    line: int = 0
    col: int = 0


@dataclass
class Module:
    name: str
    children: list = field(default_factory=list)  # Text | Parameter | Module | Union
    cache: bool = True
    line: int = 0
    col: int = 0


@dataclass
class Union:
    members: list[Module]
    scaffold: str | None = None  # default member for scaffold encoding (first member if None)
    line: int = 0
    col: int = 0

    @property
    def default(self) -> str:
        return self.scaffold or self.members[0].name


@dataclass
class Schema:
    name: str
    children: list = field(default_factory=list)
    line: int = 0
    col: int = 0

    def modules(self) -> dict[str, Module]:
        """Every module by name, depth-first in schema order."""
        out: dict[str, Module] = {}

        def walk(items):
            for it in items:
                if isinstance(it, Module):
                    out[it.name] = it
                    walk(it.children)
                elif isinstance(it, Union):
                    walk(it.members)

        walk(self.children)
        return out


def _bad(node, msg: str, expected: str | None = None) -> ParseError:
    return ParseError(msg, node.line, node.col, expected)


def _allowed_attrs(node: _Node, allowed: set[str]) -> None:
    extra = sorted(set(node.attrs) - allowed)
    if extra:
        raise _bad(node, f"<{node.tag}> has unknown attribute {extra[0]!r}",
                   "one of " + ", ".join(sorted(allowed)) if allowed else "no attributes")


def _bool_attr(node: _Node, key: str, default: bool) -> bool:
    v = node.attrs.get(key)
    if v is None:
        return default
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise _bad(node, f"{key}={v!r} in <{node.tag}>", f'{key}="true" or {key}="false"')


def _schema_items(node: _Node, names: set[str], template: dict, in_module: bool) -> list:
    items: list = []
    for ch in node.children:
        if isinstance(ch, _Chars):
            if ch.text.strip():
                items.append(Text(ch.text, ch.line, ch.col))
            continue
        if ch.tag == "module":
            items.append(_module(ch, names, template))
        elif ch.tag == "union":
            _allowed_attrs(ch, {"scaffold"})
            members = []
            for m in ch.children:
                if isinstance(m, _Chars):
                    if m.text.strip():
                        raise _bad(m, "text directly inside <union>", "only <module> members")
                    continue
                if m.tag != "module":
                    raise _bad(m, f"<{m.tag}> inside <union>", "only <module> members")
                members.append(_module(m, names, template))
            if not members:
                raise _bad(ch, "empty <union>", "at least one <module> member")
            sc = ch.attrs.get("scaffold")
            if sc is not None and sc not in {m.name for m in members}:
                raise _bad(ch, f"scaffold={sc!r} is not a member of this union",
                           "one of " + ", ".join(m.name for m in members))
            items.append(Union(members, sc, ch.line, ch.col))
        elif ch.tag == "parameter":
            _allowed_attrs(ch, {"name", "length", "scaffold"})
            if not in_module:
                raise _bad(ch, "<parameter> outside a module", "a <parameter> inside a <module>")
            if ch.children:
                raise _bad(ch, "<parameter> with content", "an empty element <parameter .../>")
            name = ch.attrs.get("name")
            if not name or not _NAME.fullmatch(name):
                raise _bad(ch, f"<parameter> name {name!r}", "a name attribute (letters, digits, _ . -)")
            length = ch.attrs.get("length", "")
            if not re.fullmatch(r"[0-9]{1,7}", length) or int(length) < 1:
                raise _bad(ch, f"<parameter name={name!r}> length={length!r}", "length=\"N\" with N >= 1")
            items.append(Parameter(name, int(length), ch.attrs.get("scaffold"), ch.line, ch.col))
        elif ch.tag in ROLE_TAGS:
            _allowed_attrs(ch, set())
            pre, post = template[ch.tag]
            items.append(Text(pre, ch.line, ch.col))
            items.extend(_schema_items(ch, names, template, in_module))
            items.append(Text(post, ch.line, ch.col))
        else:
            raise _bad(ch, f"unknown tag <{ch.tag}> in a schema",
                       "<module>, <union>, <parameter>, <system>, <user> or <assistant>")
    return [it for it in items if not (isinstance(it, Text) and it.text == "")]


def _module(node: _Node, names: set[str], template: dict) -> Module:
    _allowed_attrs(node, {"name", "cache"})
    name = node.attrs.get("name")
    if not name or not _NAME.fullmatch(name):
        raise _bad(node, f"<module> name {name!r}", "a name attribute (letters, digits, _ . -)")
    if name in names:
        raise _bad(node, f"duplicate module name {name!r}", "module names unique within a schema")
    if name in ("schema", "prompt", "module", "union", "parameter") + ROLE_TAGS:
        raise _bad(node, f"module name {name!r} is a reserved tag", "another name")
    names.add(name)
    mod = Module(name, [], _bool_attr(node, "cache", True), node.line, node.col)
    mod.children = _schema_items(node, names, template, True)
    params = [p.name for p in mod.children if isinstance(p, Parameter)]
    if len(params) != len(set(params)):
        raise _bad(node, f"module {name!r} declares a parameter twice", "unique parameter names per module")
    return mod


def parse_schema(src: str, *, template: str | dict = "plain") -> Schema:
    """PML schema text -> :class:`Schema` (raises :class:`ParseError`)."""
    tpl = CHAT_TEMPLATES[template] if isinstance(template, str) else template
    root = _parse_tree(src)
    if root.tag != "schema":
        raise _bad(root, f"root element <{root.tag}>", "<schema name=...>")
    _allowed_attrs(root, {"name"})
    name = root.attrs.get("name")
    if not name or not _NAME.fullmatch(name):
        raise _bad(root, f"<schema> name {name!r}", "a name attribute (letters, digits, _ . -)")
    return Schema(name, _schema_items(root, set(), tpl, False), root.line, root.col)


# ------------------------------------------------------------------------------------------------
# Prompt AST
@dataclass
class Import:
    name: str
    args: dict[str, str] = field(default_factory=dict)
    children: list[Import] = field(default_factory=list)
    line: int = 0
    col: int = 0


@dataclass
class Prompt:
    schema: str
    imports: list[Import]
    text: list[Text]  # uncached free text, in order (role tags expanded)
    line: int = 0
    col: int = 0

    @property
    def user_text(self) -> str:
        return "".join(t.text for t in self.text)


def _imports(node: _Node, texts: list[Text], template: dict, top: bool) -> list[Import]:
    out: list[Import] = []
    for ch in node.children:
        if isinstance(ch, _Chars):
            if not top:
                if ch.text.strip():
                    raise _bad(ch, "text inside a module import", "only nested module imports")
                continue
            if ch.text.strip():  # whitespace-only runs between imports are layout, not content
                texts.append(Text(ch.text, ch.line, ch.col))
            continue
        if ch.tag in ROLE_TAGS:
            if not top:
                raise _bad(ch, f"<{ch.tag}> inside a module import", "only nested module imports")
            pre, post = template[ch.tag]
            texts.append(Text(pre, ch.line, ch.col))
            if any(isinstance(c, _Node) for c in ch.children):
                bad = next(c for c in ch.children if isinstance(c, _Node))
                raise _bad(bad, f"<{bad.tag}> inside <{ch.tag}> of a prompt", "plain text")
            texts.extend(Text(c.text, c.line, c.col) for c in ch.children)
            texts.append(Text(post, ch.line, ch.col))
            continue
        if ch.tag in ("schema", "prompt", "module", "union", "parameter"):
            raise _bad(ch, f"<{ch.tag}> inside a prompt", "a module import such as <doc-a/>")
        out.append(Import(ch.tag, dict(ch.attrs), _imports(ch, texts, template, False), ch.line, ch.col))
    return out


def parse_prompt(src: str, *, template: str | dict = "plain") -> Prompt:
    """PML prompt text -> :class:`Prompt` (raises :class:`ParseError`)."""
    tpl = CHAT_TEMPLATES[template] if isinstance(template, str) else template
    root = _parse_tree(src)
    if root.tag != "prompt":
        raise _bad(root, f"root element <{root.tag}>", "<prompt schema=...>")
    _allowed_attrs(root, {"schema"})
    if not root.attrs.get("schema"):
        raise _bad(root, "<prompt> without a schema", 'schema="name"')
    texts: list[Text] = []
    imps = _imports(root, texts, tpl, True)
    return Prompt(root.attrs["schema"], imps, [t for t in texts if t.text], root.line, root.col)
