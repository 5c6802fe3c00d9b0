"""Edit specs: what the user asked for, as frozen values, read from YAML/JSON or the one-line DSL.

`parse_spec` is the one entry point the rest of steer uses; it never touches a
model or an SAE (resolving a spec against them is `steer.plan`'s job).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from steer.errors import SpecError
from steer.spec.dsl import format_dsl, parse_dsl
from steer.spec.edit import Condition, Edit, Spec
from steer.spec.yaml_io import dump_spec, load_spec_file, load_spec_text, located, read_spec_text, spec_to_dict

SPEC_FILE_SUFFIXES: tuple[str, ...] = (".yaml", ".yml", ".json")

__all__ = [
    "Condition", "Edit", "Spec", "SpecError", "SPEC_FILE_SUFFIXES", "dump_spec", "format_dsl", "load_spec_file",
    "load_spec_text", "parse_dsl", "parse_spec", "spec_to_dict",
]


def parse_spec(
    source: Spec | str | os.PathLike[str],
    *,
    model: str | None = None,
    sae: str | Sequence[str] | None = None,
    site: str | None = None,
) -> Spec:
    """A `Spec` from a Spec, a spec file, or DSL text.

    ``source`` is read as a file when it is a path object, an existing file, or
    a one-line string ending in .yaml / .yml / .json (which must then exist);
    any other string is DSL text (``"suppress feature 4312 by 80%"``), and an
    existing file with another suffix holds DSL text. ``model``, ``sae`` and
    ``site``, where given, fill in or override the spec's own values.
    """
    overrides = {key: value for key, value in (("model", model), ("sae", sae), ("site", site)) if value is not None}
    if isinstance(source, Spec):
        spec = source
    elif isinstance(source, os.PathLike) or _names_a_file(source):
        path = os.fspath(source)
        if not path.lower().endswith(SPEC_FILE_SUFFIXES) and os.path.isfile(path):
            edits = parse_dsl(read_spec_text(path), source=path)
            with located(path):
                spec = Spec(edits=edits, base_dir=os.path.dirname(os.path.abspath(path)))
        else:
            spec = load_spec_file(path)
    elif isinstance(source, str):
        spec = Spec(edits=parse_dsl(source))
    else:
        raise SpecError(f"a spec is a Spec, a spec file path or DSL text, got {type(source).__name__}", where="spec")
    return dataclasses.replace(spec, **overrides) if overrides else spec


def _names_a_file(source: object) -> bool:
    if not isinstance(source, str) or "\n" in source:
        return False
    return source.lower().endswith(SPEC_FILE_SUFFIXES) or os.path.isfile(source)

