"""Read and write edit specs as YAML (and JSON, which is YAML).

A spec file is a mapping with the keys of `TOP_KEYS`; each item of ``edits`` is
a mapping whose *verb key* names the operation and holds its target (an integer
feature id or a direction ``FILE.safetensors:KEY``)::

    model: smollm2-135m-instruct
    sae: saes/smollm2-l15
    edits:
      - suppress: 4312        # sugar: scale by 0.2
        by: 80%
      - clamp: 77
        to: 0
        when: active
    scope: generation

The canonical verbs are the operations of `steer.ops.OPERATIONS` with their
amount keys; their sugar (suppress / ablate / amplify / steer, declared by the
op modules) is rewritten into canonical edits while reading. `dump_spec` writes the
canonical form only, so ``load_spec_text(dump_spec(s)) == s``.

Every mistake is a `SpecError` whose ``where`` is ``FILE:LINE: edits[I].FIELD``
and whose message lists what is allowed, taken from the tuples in
`steer.spec.edit` so the message and the schema never drift. Validation of the
values themselves is `Edit`'s: this module builds an `Edit` one field group at
a time so each of `Edit`'s errors is reported at the line of the field that
caused it. This module never touches a model, an SAE or a direction file; it
never raises a YAML library exception at its caller.

The verb table and `build_edit` are shared with the one-line DSL
(`steer.spec.dsl`); the amount readers live in `steer.ops.amounts`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import yaml

from steer.errors import SpecError
from steer.ops import OPERATIONS, sugar_verbs, yaml_verbs
from steer.ops.amounts import NUMBER, Verb
from steer.spec.edit import OPS, Condition, Edit, Spec

TOP_KEYS: tuple[str, ...] = ("name", "description", "model", "sae", "site", "scope", "max_kl", "edits")
MODIFIERS: tuple[str, ...] = ("when", "units", "scope", "site")
CONDITION_KEYS: tuple[str, ...] = ("feature", "above")


# ---------------------------------------------------------------- verbs
# Amount readers and verbs come from the operation registry (`steer.ops`): each op's module names its YAML key,
# its amount's reader and default, and its sugar verbs.

SUGAR: dict[str, Verb] = sugar_verbs()
YAML_VERBS: dict[str, Verb] = yaml_verbs()


def allowed_keys(verb: str) -> tuple[str, ...]:
    amount_key = YAML_VERBS[verb].amount_key
    return (verb,) + ((amount_key,) if amount_key else ()) + MODIFIERS


# ---------------------------------------------------------------- building edits


def show(value: object, limit: int = 60) -> str:
    """A value as the user wrote it, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def located(where: str, note: str = "") -> Iterator[None]:
    """Re-raise a SpecError from inside at ``where`` (replacing its own), with ``note`` appended."""
    try:
        yield
    except SpecError as error:
        raise SpecError(error.message + note, where=where) from None


def build_edit(verb: str, stages: Iterable[tuple[dict[str, Any], str]], origin: str | None = None) -> Edit:
    """Build an `Edit` one field group at a time, so each of its errors is reported at that group's ``where``.

    The first stage gives ``op`` and the target; a placeholder amount of 1
    (valid for every op) stands in until a later stage gives the real one.
    ``origin`` (``FILE:LINE``) is where the edit was written, kept on it for the compiler's errors.
    """
    note = f" ({verb} is {YAML_VERBS[verb].op})" if verb in SUGAR else ""
    edit: Edit | None = None
    for fields, where in stages:
        with located(where, note):
            edit = Edit(amount=1.0, origin=origin, **fields) if edit is None else dataclasses.replace(edit, **fields)
    assert edit is not None
    return edit


def target_fields(value: object) -> dict[str, Any] | None:
    """``{"feature": N}`` or ``{"direction": REF}`` for a target value, or None for neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"feature": value}
    if isinstance(value, str):
        return {"direction": value}
    return None


TARGET_EXPECTED = "a feature id (an integer ≥ 0) or a direction FILE.safetensors:KEY"


# ---------------------------------------------------------------- YAML with line numbers


class LineMapping(dict):
    """A YAML mapping that remembers its own line and each key's line (1-based)."""

    line: int = 1
    key_lines: dict[Any, int]


class LineSequence(list):
    """A YAML sequence that remembers its own line and each item's line (1-based)."""

    line: int = 1
    item_lines: list[int]


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader whose mappings and sequences remember lines, that rejects duplicate keys,
    reads timestamps as plain strings and reports bad tagged scalars as YAML errors."""


def _construct_mapping(loader: _SpecLoader, node: yaml.MappingNode) -> Iterator[LineMapping]:
    data = LineMapping()
    data.line = node.start_mark.line + 1
    data.key_lines = {}
    yield data
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            key = loader.construct_object(key_node)
            if not isinstance(key, Hashable):
                continue  # construct_mapping below reports it
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {show(key)} (first given on line {first_line[key]})", key_node.start_mark
                )
            first_line[key] = key_node.start_mark.line + 1
    data.update(loader.construct_mapping(node))  # flattens merges (<<), rejects unhashable keys
    for key_node, _ in node.value:
        data.key_lines[loader.construct_object(key_node)] = key_node.start_mark.line + 1


def _construct_sequence(loader: _SpecLoader, node: yaml.SequenceNode) -> Iterator[LineSequence]:
    data = LineSequence()
    data.line = node.start_mark.line + 1
    data.item_lines = [item.start_mark.line + 1 for item in node.value]
    yield data
    data.extend(loader.construct_sequence(node))


def _checked_scalar(construct: Callable[..., Any]) -> Callable[..., Any]:
    def checked(loader: _SpecLoader, node: yaml.Node) -> Any:
        try:
            return construct(loader, node)
        except (ValueError, LookupError, TypeError, OverflowError) as error:  # `!!int abc`, `!!int ""`, a 5000-digit int
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {show(node.value)} as {node.tag} ({error})", node.start_mark
            ) from None

    return checked


def _construct_str(loader: _SpecLoader, node: yaml.ScalarNode) -> str:
    """A string, with JSON's escaped surrogate pairs (json.dumps writes "\\ud83d\\ude00" for 😀) joined."""
    text = loader.construct_scalar(node)
    if any("\ud800" <= c <= "\udfff" for c in text):
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
    return text


for _tag in ("null", "bool", "int", "float", "binary"):
    _tag = f"tag:yaml.org,2002:{_tag}"
    _SpecLoader.add_constructor(_tag, _checked_scalar(yaml.SafeLoader.yaml_constructors[_tag]))
_SpecLoader.add_constructor("tag:yaml.org,2002:str", _construct_str)
_SpecLoader.add_constructor("tag:yaml.org,2002:timestamp", _construct_str)
_SpecLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_SpecLoader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)


def parse_yaml(text: str, source: str) -> Any:
    """The YAML document in ``text``; any YAML problem becomes a SpecError with its line."""
    try:
        return yaml.load(text, Loader=_SpecLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = " ".join(part for part in (error.context, error.problem) if part)
        raise SpecError(f"malformed YAML: {problem}", where=where) from None
    except yaml.reader.ReaderError as error:
        line = text.count("\n", 0, error.position) + 1
        message = f"malformed YAML: {error.reason} character {error.character!r}"
        raise SpecError(message, where=f"{source}:{line}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"malformed YAML: {error}", where=source) from None
    except RecursionError:
        raise SpecError("malformed YAML: nested too deeply", where=source) from None


# ---------------------------------------------------------------- reading a spec


def kind_of(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return show(value)


def _line_of(mapping: dict, key: object) -> int:
    return mapping.key_lines.get(key, mapping.line) if isinstance(mapping, LineMapping) else 1


def _check_keys(mapping: dict, allowed: tuple[str, ...], where: Callable[[object], str], what: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise SpecError(f"unknown key {show(key)} in {what}; allowed: {', '.join(allowed)}", where=where(key))


def _optional_str(value: object, key: str, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise SpecError(f"`{key}` must be a string, got {show(value)}", where=where)


def load_spec_text(text: str, source: str = "<text>", *, base_dir: str | None = None) -> Spec:
    """Read a spec from YAML or JSON text; ``source`` names it in errors."""
    data = parse_yaml(text, source)
    if data is None:
        raise SpecError(f"empty spec; expected a mapping with keys {', '.join(TOP_KEYS)}", where=f"{source}:1")
    if not isinstance(data, dict):
        line = getattr(data, "line", 1)
        raise SpecError(
            f"a spec is a mapping with keys {', '.join(TOP_KEYS)}, got {kind_of(data)}", where=f"{source}:{line}"
        )

    def where(key: object) -> str:
        return f"{source}:{_line_of(data, key)}: {key}"

    _check_keys(data, TOP_KEYS, where, "the spec")
    if "edits" not in data:
        raise SpecError("a spec needs `edits`: a list of edits", where=f"{source}:{getattr(data, 'line', 1)}")
    fields = {key: _optional_str(data.get(key), key, where(key)) for key in ("name", "description", "model", "site")}
    sae = _read_sae(data.get("sae"), where("sae"), source)
    scope = data.get("scope", "all")
    max_kl = _read_max_kl(data.get("max_kl"), where("max_kl"))
    edits = _read_edits(data["edits"], where("edits"), source)
    with located(where("scope")):  # edits are non-empty and Edits: only the scope is left to fail
        return Spec(edits=edits, sae=sae, scope=scope, max_kl=max_kl, base_dir=base_dir, **fields)


def _read_max_kl(value: object, where: str) -> float | None:
    """``max_kl``: absent/null, or a number ≥ 0 (nats per token)."""
    if value is None:
        return None
    number = NUMBER.read(value)
    if number is None or number < 0:
        raise SpecError(f"`max_kl` must be a number ≥ 0 (the largest accepted mean KL(hooks‖artifact) per token, "
                        f"in nats, of an approximate lowering), got {show(value)}", where=where)
    return number


def _read_sae(value: object, where: str, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                line = value.item_lines[i] if isinstance(value, LineSequence) else 1
                message = f"each SAE must be a path or name (a string), got {show(item)}"
                raise SpecError(message, where=f"{source}:{line}: sae[{i}]")
        return tuple(value)
    raise SpecError(f"`sae` must be a path or name, or a list of them, got {kind_of(value)}", where=where)


def _read_edits(value: object, where: str, source: str) -> tuple[Edit, ...]:
    if not isinstance(value, list):
        raise SpecError(f"`edits` must be a list of edits, got {kind_of(value)}", where=where)
    if not value:
        raise SpecError("a spec needs at least one edit", where=where)
    lines = value.item_lines if isinstance(value, LineSequence) else [1] * len(value)
    return tuple(_read_edit(item, i, lines[i], source) for i, item in enumerate(value))


def _read_edit(item: object, index: int, line: int, source: str) -> Edit:
    path = f"edits[{index}]"

    def where(key: object) -> str:
        """The line of ``key`` in this edit (the edit's own line if it is absent)."""
        return f"{source}:{_line_of(item, key) if key in item else line}: {path}.{key}"

    verbs_allowed = f"{', '.join(OPS)} (or {', '.join(SUGAR)})"
    if not isinstance(item, dict):
        message = f"an edit is a mapping like `scale: 12` with `factor: 0.5`, got {kind_of(item)}"
        raise SpecError(message, where=f"{source}:{line}: {path}")
    verbs = [key for key in item if key in YAML_VERBS]
    if not verbs:
        unknown = [key for key in item if key not in MODIFIERS]
        if unknown:
            raise SpecError(f"unknown operation {show(unknown[0])}; allowed: {verbs_allowed}", where=where(unknown[0]))
        raise SpecError(f"edit has no operation; allowed: {verbs_allowed}", where=f"{source}:{line}: {path}")
    if len(verbs) > 1:
        raise SpecError(f"one operation per edit, got `{verbs[0]}` and `{verbs[1]}`", where=where(verbs[1]))
    name = verbs[0]
    verb = YAML_VERBS[name]
    _check_keys(item, allowed_keys(name), where, f"this {name} edit")

    target = target_fields(item[name])
    directions = OPERATIONS[verb.op].directions
    if target is None or (not directions and "feature" not in target):
        expected = TARGET_EXPECTED if directions else "a feature id (an integer ≥ 0)"
        raise SpecError(f"`{name}` needs {expected}, got {show(item[name])}", where=where(name))

    amount: float | None = verb.fixed
    if verb.amount_key is not None and verb.amount is not None:
        if verb.amount_key in item:
            amount = verb.amount.read(item[verb.amount_key])
            if amount is None:
                raise SpecError(
                    f"`{verb.amount_key}` must be {verb.amount.expected}, got {show(item[verb.amount_key])}",
                    where=where(verb.amount_key),
                )
        elif verb.required:
            raise SpecError(f"{name} needs `{verb.amount_key}` ({verb.amount.expected})", where=where(verb.amount_key))

    stages: list[tuple[dict[str, Any], str]] = [
        ({"op": verb.op, **target}, where(name)),
        ({"amount": amount}, where(verb.amount_key if verb.amount_key in item else name)),
    ]
    for key in MODIFIERS:
        if key not in item:
            continue
        value = item[key]
        if key == "when" and isinstance(value, dict):
            value = _read_condition(value, source, f"{path}.when", where("when"))
        elif key == "site":
            value = _optional_str(value, "site", where("site"))
        stages.append(({key: value}, where(key)))
    return build_edit(name, stages, origin=f"{source}:{line}")


def _read_condition(value: dict, source: str, path: str, where: str) -> Condition:
    """``{feature: J, above: T}`` at ``path`` (``edits[I].when``); whether J is a valid feature id is `Edit`'s to check."""

    def where_key(key: object) -> str:
        return f"{source}:{_line_of(value, key)}: {path}.{key}"

    _check_keys(value, CONDITION_KEYS, where_key, "`when`")
    for key in CONDITION_KEYS:
        if key not in value:
            raise SpecError(f"`when` needs `{key}`: write {{feature: J, above: T}}", where=where)
    above = NUMBER.read(value["above"])
    if above is None:
        raise SpecError(f"`when.above` must be a number, got {show(value['above'])}", where=where_key("above"))
    return Condition(value["feature"], above)


def read_spec_text(path: str | os.PathLike[str]) -> str:
    """The text of a spec file (UTF-8); a missing or unreadable file is a SpecError."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise SpecError("no such spec file" if not os.path.exists(source) else "not a file", where=source)
    try:
        with open(source, encoding="utf-8") as file:
            return file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise SpecError(f"cannot read the spec file: {error}", where=source) from None


def load_spec_file(path: str | os.PathLike[str]) -> Spec:
    """Read a .yaml / .yml / .json spec file; relative paths in it resolve against its directory."""
    source = os.fspath(path)
    return load_spec_text(read_spec_text(source), source, base_dir=os.path.dirname(os.path.abspath(source)))


# ---------------------------------------------------------------- writing a spec


def edit_to_dict(edit: Edit) -> dict[str, Any]:
    """The canonical YAML mapping of one edit; defaults (when always, raw units, no scope or site) are left out."""
    out: dict[str, Any] = {edit.op: edit.feature if edit.feature is not None else edit.direction}
    out[OPERATIONS[edit.op].amount_key] = edit.amount
    if isinstance(edit.when, Condition):
        out["when"] = {"feature": edit.when.feature, "above": edit.when.above}
    elif edit.when != "always":
        out["when"] = edit.when
    if edit.units != "raw":
        out["units"] = edit.units
    if edit.scope is not None:
        out["scope"] = edit.scope
    if edit.site is not None:
        out["site"] = edit.site
    return out


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    """The canonical mapping of a spec (plain dicts, lists and scalars); ``base_dir`` is not part of it."""
    out: dict[str, Any] = {}
    for key in ("name", "description", "model"):
        if getattr(spec, key) is not None:
            out[key] = getattr(spec, key)
    if spec.sae:
        out["sae"] = spec.sae[0] if len(spec.sae) == 1 else list(spec.sae)
    if spec.site is not None:
        out["site"] = spec.site
    if spec.scope != "all":
        out["scope"] = spec.scope
    if spec.max_kl is not None:
        out["max_kl"] = spec.max_kl
    out["edits"] = [edit_to_dict(edit) for edit in spec.edits]
    return out


class _SpecDumper(yaml.SafeDumper):
    """SafeDumper that double-quotes strings holding YAML line breaks (NEL, LS, PS), which plain or
    single-quoted style would fold into spaces on reading back."""


def _represent_str(dumper: _SpecDumper, text: str) -> yaml.ScalarNode:
    style = '"' if any(c in text for c in "\x85\u2028\u2029") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_SpecDumper.add_representer(str, _represent_str)


def dump_spec(spec: Spec) -> str:
    """The spec as canonical YAML: ``load_spec_text(dump_spec(s)) == s``."""
    return yaml.dump(spec_to_dict(spec), Dumper=_SpecDumper, sort_keys=False, allow_unicode=True)
