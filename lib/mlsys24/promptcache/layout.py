"""Position layout of a PML schema, and resolution of a prompt against it (Prompt Cache, Sec. 3.3).

One pass over the schema with a running offset ``o``:

- text of ``n`` tokens -> positions ``[o, o+n)``, ``o += n``;
- ``<parameter length=L>`` -> reserves ``[o, o+L)`` (filled with its scaffold tokens, padded with
  ``pad_id``, at encode time), ``o += L``;
- ``<module>`` -> its children laid out from its offset;
- ``<union>`` -> every member starts at the same ``o``; ``o += max(member lengths)``;
- ``len(schema)`` = final ``o``.

A prompt's uncached user text gets positions ``[len(schema), len(schema)+m)``; a parameter argument of
``k <= L`` tokens takes the first ``k`` positions of its slot.

The text outside any module belongs to the implicit root module :data:`ROOT`, always selected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .pml import Import, Module, Parameter, ParseError, Prompt, Schema, Text, Union, parse_prompt

__all__ = ["ROOT", "Segment", "ModuleSpan", "SchemaLayout", "Selection", "layout"]

ROOT = "<root>"


@dataclass
class Segment:
    """A run of schema tokens: text (cacheable) or a parameter slot."""

    kind: str  # "text" | "param"
    module: str  # owning module (ROOT for text outside modules)
    start: int  # first position id
    ids: list[int]  # token ids (a param: its scaffold filler, exactly `length` tokens)
    name: str | None = None  # parameter name

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def end(self) -> int:
        return self.start + len(self.ids)


@dataclass
class ModuleSpan:
    name: str
    parent: str | None
    start: int
    end: int
    cache: bool = True
    union: int | None = None  # index into SchemaLayout.unions when a union member
    segments: list[int] = field(default_factory=list)  # own segments (not children's), schema order
    children: list[str] = field(default_factory=list)
    line: int = 0
    col: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class Selection:
    """What one prompt needs: cached modules and the uncached tokens with their positions."""

    modules: list[str]  # selected modules (ROOT first), schema order
    cached: list[str]  # the subset served from the cache
    uncached_ids: list[int]  # arguments, uncached modules, then the user text (prefill order)
    uncached_pos: list[int]
    n_user: int  # the last n_user uncached tokens are the user text
    args: dict[tuple[str, str], list[int]]  # (module, parameter) -> argument ids

    def full_sequence(self, lay: SchemaLayout) -> tuple[list[int], list[int]]:
        """Every token of the prompt in schema order with its schema position (user text last):
        what a full recompute sees. Parameter slots hold only the argument tokens."""
        ids, pos = [], []
        sel = set(self.modules)
        for seg in lay.segments:
            if seg.module not in sel or not lay.visible(seg.module, sel):
                continue
            if seg.kind == "text":
                ids += seg.ids
                pos += list(range(seg.start, seg.end))
            else:
                a = self.args.get((seg.module, seg.name), [])
                ids += a
                pos += list(range(seg.start, seg.start + len(a)))
        ids += self.uncached_ids[len(self.uncached_ids) - self.n_user:]
        pos += self.uncached_pos[len(self.uncached_pos) - self.n_user:]
        return ids, pos


class SchemaLayout:
    """Token ids and position ids of every segment of a schema."""

    def __init__(self, schema: Schema, tokenizer, pad_id: int | None = None):
        self.schema, self.tokenizer = schema, tokenizer
        self.pad_id = pad_id if pad_id is not None else tokenizer.encode(" ")[0]
        self.segments: list[Segment] = []
        self.modules: dict[str, ModuleSpan] = {ROOT: ModuleSpan(ROOT, None, 0, 0)}
        self.unions: list[tuple[list[str], str]] = []  # (member names, default member)
        self.length = self._lay(schema.children, ROOT, 0)
        self.modules[ROOT].end = self.length

    # ------------------------------------------------------------------------------------------
    def _lay(self, items, owner: str, o: int) -> int:
        for it in items:
            if isinstance(it, Text):
                ids = self.tokenizer.encode(it.text)
                if ids:
                    self.modules[owner].segments.append(len(self.segments))
                    self.segments.append(Segment("text", owner, o, list(ids)))
                    o += len(ids)
            elif isinstance(it, Parameter):
                fill = list(self.tokenizer.encode(it.scaffold))[: it.length] if it.scaffold else []
                fill += [self.pad_id] * (it.length - len(fill))
                self.modules[owner].segments.append(len(self.segments))
                self.segments.append(Segment("param", owner, o, fill, it.name))
                o += it.length
            elif isinstance(it, Module):
                o = self._module(it, owner, o, None)
            elif isinstance(it, Union):
                ui = len(self.unions)
                self.unions.append(([m.name for m in it.members], it.default))
                end = o
                for m in it.members:
                    end = max(end, self._module(m, owner, o, ui))
                o = end
        return o

    def _module(self, m: Module, parent: str, o: int, union: int | None) -> int:
        span = ModuleSpan(m.name, parent, o, o, m.cache, union, line=m.line, col=m.col)
        self.modules[m.name] = span
        self.modules[parent].children.append(m.name)
        span.end = self._lay(m.children, m.name, o)
        return span.end

    # ------------------------------------------------------------------------------------------
    def ancestors(self, name: str) -> list[str]:
        out = []
        p = self.modules[name].parent
        while p is not None:
            out.append(p)
            p = self.modules[p].parent
        return out

    def visible(self, name: str, selected: set[str]) -> bool:
        return all(a in selected for a in self.ancestors(name))

    def module_tokens(self, name: str) -> tuple[list[int], list[int]]:
        """Cached content of a module: its own text segments (no slots, no children) and positions."""
        ids, pos = [], []
        for si in self.modules[name].segments:
            seg = self.segments[si]
            if seg.kind == "text":
                ids += seg.ids
                pos += list(range(seg.start, seg.end))
        return ids, pos

    def table(self) -> list[dict]:
        """One row per segment: module, kind, [start, end), first characters."""
        rows = []
        for seg in self.segments:
            span = self.modules[seg.module]
            text = self.tokenizer.decode(seg.ids) if seg.kind == "text" else f"<{seg.name}: {seg.length} slots>"
            rows.append({"module": seg.module, "union": span.union, "kind": seg.kind, "start": seg.start,
                         "end": seg.end, "text": text[:40].replace("\n", "\\n")})
        return rows

    # ------------------------------------------------------------------------------------------
    def resolve(self, prompt: Prompt | str) -> Selection:
        """Check a prompt against the schema and list its cached modules and uncached tokens."""
        if isinstance(prompt, str):
            prompt = parse_prompt(prompt)
        if prompt.schema != self.schema.name:
            raise ParseError(f"prompt uses schema {prompt.schema!r}, this layout is {self.schema.name!r}",
                             prompt.line, prompt.col, f'schema="{self.schema.name}"')
        selected = [ROOT]
        args: dict[tuple[str, str], list[int]] = {}
        union_pick: dict[int, Import] = {}

        def visit(imps: list[Import], parent: str):
            for imp in imps:
                span = self.modules.get(imp.name)
                if span is None or imp.name == ROOT or span.parent != parent:
                    where = "at top level" if parent == ROOT else f"inside <{parent}>"
                    opts = [c for c in self.modules[parent].children]
                    raise ParseError(f"<{imp.name}> is not a module {where} of schema {self.schema.name!r}",
                                     imp.line, imp.col, "one of " + (", ".join(f"<{c}/>" for c in opts) or "none"))
                if imp.name in selected:
                    raise ParseError(f"module <{imp.name}> imported twice", imp.line, imp.col, "each module once")
                if span.union is not None:
                    prev = union_pick.get(span.union)
                    if prev is not None:
                        raise ParseError(f"<{imp.name}> and <{prev.name}> are members of the same union",
                                         imp.line, imp.col, "one member per union")
                    union_pick[span.union] = imp
                params = {self.segments[si].name: self.segments[si] for si in span.segments
                          if self.segments[si].kind == "param"}
                for key, val in imp.args.items():
                    seg = params.get(key)
                    if seg is None:
                        raise ParseError(f"module <{imp.name}> has no parameter {key!r}", imp.line, imp.col,
                                         "one of " + (", ".join(params) or "no parameters"))
                    ids = list(self.tokenizer.encode(val))
                    if len(ids) > seg.length:
                        raise ParseError(f"argument {key}= of <{imp.name}> has {len(ids)} tokens, the slot holds "
                                         f"{seg.length}", imp.line, imp.col, f"at most {seg.length} tokens")
                    args[(imp.name, key)] = ids
                selected.append(imp.name)
                visit(imp.children, imp.name)

        visit(prompt.imports, ROOT)
        order = {name: i for i, name in enumerate(self.modules)}
        selected.sort(key=order.__getitem__)
        cached = [m for m in selected if self.modules[m].cache and self.module_tokens(m)[0]]
        unc_ids: list[int] = []
        unc_pos: list[int] = []
        sel = set(selected)
        for seg in self.segments:  # arguments and uncached modules, schema order
            if seg.module not in sel:
                continue
            if seg.kind == "param":
                a = args.get((seg.module, seg.name), [])
                unc_ids += a
                unc_pos += list(range(seg.start, seg.start + len(a)))
            elif not self.modules[seg.module].cache:
                unc_ids += seg.ids
                unc_pos += list(range(seg.start, seg.end))
        user = list(self.tokenizer.encode(prompt.user_text)) if prompt.text else []
        unc_ids += user
        unc_pos += list(range(self.length, self.length + len(user)))
        return Selection(selected, cached, unc_ids, unc_pos, len(user), args)

    def positions(self, ids_pos: tuple[list[int], list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, pos = ids_pos
        return torch.tensor([ids], dtype=torch.long), torch.tensor([pos], dtype=torch.long)


def layout(schema: Schema | str, tokenizer=None, pad_id: int | None = None) -> SchemaLayout:
    """Lay out a schema (PML text or parsed) with ``tokenizer`` (default: the byte tokenizer)."""
    if isinstance(schema, str):
        from .pml import parse_schema

        schema = parse_schema(schema)
    if tokenizer is None:
        from ..models import ByteTokenizer

        tokenizer = ByteTokenizer()
    return SchemaLayout(schema, tokenizer, pad_id)
