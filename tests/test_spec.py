"""Edit specs: YAML/JSON and the one-line DSL read into the `Edit`s written out here by hand,
round trips (by example and by hypothesis), errors that name the field and line, and fuzzing
that shows any input either parses or raises a SpecError, never anything else."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steer.spec import (
    Condition, Edit, Spec, SpecError, dump_spec, format_dsl, load_spec_file, load_spec_text, parse_dsl, parse_spec,
    spec_to_dict,
)
from steer.ops import OPERATIONS
from steer.spec.edit import OPS, SCOPES, UNITS

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def spec_error(call, *args, **kwargs) -> SpecError:
    with pytest.raises(SpecError) as info:
        call(*args, **kwargs)
    return info.value


# ---------------------------------------------------------------- DSL by example

DSL_EXAMPLES = {
    "suppress feature 4312 by 80%": Edit("scale", feature=4312, amount=0.2),
    "ablate feature 12": Edit("scale", feature=12, amount=0.0),
    "amplify feature 9 by 2x": Edit("scale", feature=9, amount=2.0),
    "clamp feature 77 to 3.5 when active": Edit("clamp", feature=77, amount=3.5, when="active"),
    "steer feature 1021 by +4": Edit("add", feature=1021, amount=4.0),
    "steer feature 1021 by -2 units norm": Edit("add", feature=1021, amount=-2.0, units="norm"),
    "project out direction dirs.safetensors:refusal": Edit("project_out", direction="dirs.safetensors:refusal", amount=1.0),
    "monitor feature 55 above 1.0": Edit("monitor", feature=55, amount=1.0),
}


@pytest.mark.parametrize("text", list(DSL_EXAMPLES))
def test_dsl_examples(text):
    assert parse_dsl(text) == (DSL_EXAMPLES[text],)


def test_dsl_suppress_is_exact():
    (edit,) = parse_dsl("suppress feature 1 by 80%")
    assert edit.amount == 0.2 and 1 - 0.8 != 0.2  # decimal arithmetic, not 0.19999999999999996
    assert parse_dsl("suppress feature 1 by 0.8") == parse_dsl("suppress feature 1 by 80%")


def test_dsl_several_edits_comments_and_semicolons():
    text = """
    # steer away from refusals
    suppress feature 4312 by 80%   # the main one
    ablate feature 12; amplify feature 9 by 2x

    clamp feature 77 to 3.5 when active ; steer feature 1021 by +4
    """
    assert parse_dsl(text) == tuple(DSL_EXAMPLES[t] for t in list(DSL_EXAMPLES)[:5])


def test_dsl_all_clauses_in_any_order():
    expected = Edit("add", direction="d.safetensors:k", amount=-1.5, units="norm", scope="generation",
                    when=Condition(3, 0.25), site="resid_post.12")
    a = "add direction d.safetensors:k by -1.5 units norm when feature 3 above 0.25 scope generation site resid_post.12"
    b = "add direction d.safetensors:k site resid_post.12 scope generation when feature 3 above 0.25 units norm by -1.5"
    assert parse_dsl(a) == parse_dsl(b) == (expected,)


@pytest.mark.parametrize("text, expected", [
    ("scale feature 3 by 0.5", Edit("scale", feature=3, amount=0.5)),
    ("amplify feature 3 by 2", Edit("scale", feature=3, amount=2.0)),
    ("add feature 3 by 1e-3 units feature", Edit("add", feature=3, amount=0.001, units="feature")),
    ("project out direction a.safetensors:k by 50%", Edit("project_out", direction="a.safetensors:k", amount=0.5)),
    ("project out feature 3 by 0.25", Edit("project_out", feature=3, amount=0.25)),
    ("cap direction a.safetensors:k at 2 units norm", Edit("cap", direction="a.safetensors:k", amount=2.0, units="norm")),
    ("monitor feature 5", Edit("monitor", feature=5, amount=0.0)),
    ("clamp feature 7 to 0 when always scope prompt", Edit("clamp", feature=7, amount=0.0, scope="prompt")),
    ('steer direction "my dirs.safetensors:a;b" by 1 site "odd # site"',
     Edit("add", direction="my dirs.safetensors:a;b", amount=1.0, site="odd # site")),
])
def test_dsl_more_forms(text, expected):
    assert parse_dsl(text) == (expected,)


def test_dsl_empty_text_has_no_edits():
    assert parse_dsl("") == parse_dsl("  # only a comment\n\n ; ;") == ()


def test_format_dsl_is_canonical():
    edits = tuple(DSL_EXAMPLES.values())
    assert format_dsl(edits).splitlines() == [
        "scale feature 4312 by 0.2",
        "scale feature 12 by 0.0",
        "scale feature 9 by 2.0",
        "clamp feature 77 to 3.5 when active",
        "add feature 1021 by 4.0",
        "add feature 1021 by -2.0 units norm",
        "project out direction dirs.safetensors:refusal by 1.0",
        "monitor feature 55 above 1.0",
    ]
    assert parse_dsl(format_dsl(edits)) == edits


@pytest.mark.parametrize("text, line, words", [
    ("ablate feature 1\nscale feature 2 by lots", 2, ["expected a number after `by`", "'lots'"]),
    ("supress feature 1 by 80%", 1, ["unknown verb 'supress'", "suppress", "project out"]),
    ("scale feature x by 2", 1, ["feature id", "'x'"]),
    ("scale feature 1.5 by 2", 1, ["feature id", "'1.5'"]),
    ("scale feature 1", 1, ["scale needs `by`"]),
    ("\n\nsuppress feature 1", 3, ["suppress needs `by`", "80%"]),
    ("suppress feature 1 by 120%", 1, ["after `by`", "'120%'"]),
    ("scale feature 1 to 2", 1, ["`by`", "not `to`"]),
    ("ablate feature 1 by 2", 1, ["no amount"]),
    ("scale feature 1 by -1", 1, ["factor", "≥ 0"]),
    ("scale direction d.safetensors:k by 2", 1, ["feature"]),
    ("add direction nokey by 1", 1, ["FILE:KEY"]),
    ("clamp feature 1 to 2 when sometimes", 1, ["after `when`", "'sometimes'"]),
    ("clamp feature 1 to 2 when feature 2 above", 1, ["a number after `above`", "end of the edit"]),
    ("clamp feature 1 to 2 when feature 2 over 3", 1, ["`above T`", "'over'"]),
    ("scale feature 1 by 1 units norm", 1, ["units", "raw", "'norm'"]),
    ("add feature 1 by 1 units kg", 1, ["units", ", ".join(UNITS)]),
    ("add feature 1 by 1 scope later", 1, ["scope", ", ".join(SCOPES)]),
    ("add feature 1 by 1 by 2", 1, ["`by` given twice"]),
    ("add feature 1 by 1 loudly", 1, ["unexpected 'loudly'", "`units`", "`when`"]),
    ("project feature 1", 1, ["`out`", "'feature'"]),
    ("monitor feature 3 above 1 when active", 1, ["monitor takes no `when`"]),
    ('add direction "a.safetensors:k by 1', 1, ["unterminated quote"]),
    ("steer", 1, ["after `steer`", "end of the edit"]),
    ("steer neuron 3 by 1", 1, ["`feature N` or `direction FILE:KEY`", "'neuron'"]),
])
def test_dsl_errors_name_line_word_and_expectation(text, line, words):
    error = spec_error(parse_dsl, text)
    assert error.where == f"line {line}"
    for word in words:
        assert word in error.message, (word, error.message)


def test_dsl_error_reads_as_one_line():
    assert str(spec_error(parse_dsl, "scale feature 1 by 1\nsuppress feature 2 by lots")) == (
        "line 2: expected a percentage from 0% to 100% (like 80%) or a fraction from 0 to 1 after `by`, got 'lots'"
    )
    assert str(spec_error(parse_dsl, "scale feature 1 by 1\nscale feature 2 by lots")) == (
        "line 2: expected a number after `by`, got 'lots'"
    )


# ---------------------------------------------------------------- YAML / JSON by example

ISSUE_EXAMPLE = """\
model: smollm2-135m-instruct
sae: saes/smollm2-l15
edits:
  - suppress: 4312
    by: 80%
  - clamp: 77
    to: 0
    when: active
scope: generation
"""


def test_yaml_issue_example():
    assert load_spec_text(ISSUE_EXAMPLE) == Spec(
        model="smollm2-135m-instruct",
        sae=("saes/smollm2-l15",),
        edits=(Edit("scale", feature=4312, amount=0.2), Edit("clamp", feature=77, amount=0.0, when="active")),
        scope="generation",
    )


def test_yaml_canonical_forms():
    text = """\
name: tone-down
description: |
  Two lines
  of why.
model: m
sae: [a, b]
site: resid_post.3
edits:
  - scale: 1
    factor: 0.5
  - clamp: 2
    to: -1.5
    units: feature
    when: {feature: 9, above: 0.25}
  - add: dirs.safetensors:happy
    strength: 4
    units: norm
    scope: prompt
    site: resid_post.4
  - project_out: dirs.safetensors:refusal
  - project_out: 5
    fraction: 0.5
  - cap: dirs.safetensors:refusal
    at: 1e-3
  - monitor: 55
  - monitor: 56
    above: 2
"""
    assert load_spec_text(text) == Spec(
        name="tone-down",
        description="Two lines\nof why.\n",
        model="m",
        sae=("a", "b"),
        site="resid_post.3",
        edits=(
            Edit("scale", feature=1, amount=0.5),
            Edit("clamp", feature=2, amount=-1.5, units="feature", when=Condition(9, 0.25)),
            Edit("add", direction="dirs.safetensors:happy", amount=4.0, units="norm", scope="prompt", site="resid_post.4"),
            Edit("project_out", direction="dirs.safetensors:refusal", amount=1.0),
            Edit("project_out", feature=5, amount=0.5),
            Edit("cap", direction="dirs.safetensors:refusal", amount=0.001),
            Edit("monitor", feature=55, amount=0.0),
            Edit("monitor", feature=56, amount=2.0),
        ),
    )


@pytest.mark.parametrize("item, expected", [
    ("{suppress: 4312, by: 80%}", Edit("scale", feature=4312, amount=0.2)),
    ("{suppress: 4312, by: 0.8}", Edit("scale", feature=4312, amount=0.2)),
    ("{suppress: 4312, by: 100%}", Edit("scale", feature=4312, amount=0.0)),
    ("{ablate: 12}", Edit("scale", feature=12, amount=0.0)),
    ("{amplify: 9, by: 2x}", Edit("scale", feature=9, amount=2.0)),
    ("{amplify: 9, by: 2}", Edit("scale", feature=9, amount=2.0)),
    ("{amplify: 9, by: 1.5x}", Edit("scale", feature=9, amount=1.5)),
    ("{steer: 1021, by: +4}", Edit("add", feature=1021, amount=4.0)),
    ("{steer: 'd.safetensors:k', by: -2, units: norm}", Edit("add", direction="d.safetensors:k", amount=-2.0, units="norm")),
    ("{clamp: 77, to: 3.5, when: always}", Edit("clamp", feature=77, amount=3.5)),
])
def test_yaml_sugar(item, expected):
    assert load_spec_text(f"edits: [{item}]").edits == (expected,)
    assert load_spec_text(f"edits: [{item}]").edits[0].amount == expected.amount  # exact, not approximately


def test_json_file_and_yaml_file(tmp_path):
    data = {"model": "m", "sae": "s", "edits": [{"suppress": 4312, "by": "80%"}, {"clamp": 77, "to": 0, "when": "active"}],
            "scope": "generation"}
    (tmp_path / "spec.json").write_text(json.dumps(data))
    (tmp_path / "spec.yaml").write_text(ISSUE_EXAMPLE.replace("smollm2-135m-instruct", "m").replace("saes/smollm2-l15", "s"))
    from_json = load_spec_file(tmp_path / "spec.json")
    from_yaml = load_spec_file(str(tmp_path / "spec.yaml"))
    assert from_json == from_yaml == load_spec_text(json.dumps(data))
    assert from_json.base_dir == str(tmp_path)


def test_dump_spec_writes_the_canonical_form():
    spec = load_spec_text(ISSUE_EXAMPLE)
    assert yaml.safe_load(dump_spec(spec)) == spec_to_dict(spec) == {
        "model": "smollm2-135m-instruct",
        "sae": "saes/smollm2-l15",
        "scope": "generation",
        "edits": [{"scale": 4312, "factor": 0.2}, {"clamp": 77, "to": 0.0, "when": "active"}],
    }
    assert load_spec_text(dump_spec(spec)) == spec


# ---------------------------------------------------------------- YAML errors

BAD_YAML = [
    # (text, where, words in the message)
    ("edits:\n  - scale: 3\n    factor: 2\n    colour: red\n", "spec.yaml:4: edits[0].colour",
     ["unknown key 'colour'", "factor, when, units, scope, site"]),
    ("model: m\nmodle: n\nedits: [{ablate: 1}]\n", "spec.yaml:2: modle", ["unknown key 'modle'", "model"]),
    ("edits:\n  - ablate: 1\n  - squash: 3\n    by: 2\n", "spec.yaml:3: edits[1].squash",
     ["unknown operation 'squash'", ", ".join(OPS), "suppress"]),
    ("edits:\n  - when: active\n", "spec.yaml:2: edits[0]", ["no operation"]),
    ("edits:\n  - scale: 3\n    factor: -0.5\n", "spec.yaml:3: edits[0].factor", ["`factor`", "≥ 0"]),
    ("edits:\n  - amplify: 3\n    by: -2x\n", "spec.yaml:3: edits[0].by", ["factor", "≥ 0", "amplify is scale"]),
    ("edits:\n  - scale: 3.5\n    factor: 1\n", "spec.yaml:2: edits[0].scale", ["feature id", "3.5"]),
    ("edits:\n  - clamp: seven\n    to: 1\n", "spec.yaml:2: edits[0].clamp", ["feature id", "'seven'"]),
    ("edits:\n  - add: [1]\n    strength: 1\n", "spec.yaml:2: edits[0].add", ["feature id", "direction"]),
    ("edits:\n  - add: -4\n    strength: 1\n", "spec.yaml:2: edits[0].add", ["feature", "≥ 0"]),
    ("edits:\n  - scale: 3\n", "spec.yaml:2: edits[0].factor", ["scale needs `factor`"]),
    ("edits:\n  - ablate: 1\n  - suppress: 3\n", "spec.yaml:3: edits[1].by", ["suppress needs `by`", "80%"]),
    ("edits:\n  - suppress: 3\n    by: lots\n", "spec.yaml:3: edits[0].by", ["`by`", "80%", "'lots'"]),
    ("edits:\n  - clamp: 3\n    to: .inf\n", "spec.yaml:3: edits[0].to", ["`to`", "number"]),
    ("edits:\n  - scale: 3\n    factor: 2\n    units: norm\n", "spec.yaml:4: edits[0].units",
     ["scale takes units raw", "'norm'"]),
    ("edits:\n  - suppress: 3\n    by: 5%\n    units: feature\n", "spec.yaml:4: edits[0].units",
     ["units raw", "suppress is scale"]),
    ("edits:\n  - add: d.safetensors:k\n    strength: 1\n    units: feature\n", "spec.yaml:4: edits[0].units",
     ["units `feature` need a feature target"]),
    ("edits:\n  - add: 1\n    strength: 1\n    units: volts\n", "spec.yaml:4: edits[0].units", [", ".join(UNITS)]),
    ("edits:\n  - add: 1\n    strength: 1\n    scope: sometimes\n", "spec.yaml:4: edits[0].scope", [", ".join(SCOPES)]),
    ("scope: sometimes\nedits: [{ablate: 1}]\n", "spec.yaml:1: scope", [", ".join(SCOPES)]),
    ("edits:\n  - clamp: 3\n    to: 1\n    when: rarely\n", "spec.yaml:4: edits[0].when", ["always, active", "'rarely'"]),
    ("edits:\n  - clamp: 3\n    to: 1\n    when:\n      feature: 2\n      over: 1\n", "spec.yaml:6: edits[0].when.over",
     ["unknown key 'over'", "feature, above"]),
    ("edits:\n  - clamp: 3\n    to: 1\n    when:\n      feature: 2\n", "spec.yaml:4: edits[0].when", ["needs `above`"]),
    ("edits:\n  - clamp: 3\n    to: 1\n    when: {feature: 2, above: x}\n", "spec.yaml:4: edits[0].when.above",
     ["a number", "'x'"]),
    ("edits:\n  - monitor: 3\n    when: active\n", "spec.yaml:3: edits[0].when", ["monitor takes no `when`"]),
    ("edits:\n  - add: 3\n    strength: 1\n    site: 12\n", "spec.yaml:4: edits[0].site", ["`site` must be a string"]),
    ("edits:\n  - scale: 3\n    clamp: 4\n    factor: 1\n", "spec.yaml:3: edits[0].clamp", ["one operation per edit"]),
    ("edits:\n  - 5\n", "spec.yaml:2: edits[0]", ["an edit is a mapping"]),
    ("edits: []\n", "spec.yaml:1: edits", ["at least one edit"]),
    ("edits: {scale: 1}\n", "spec.yaml:1: edits", ["a list of edits"]),
    ("model: m\n", "spec.yaml:1", ["needs `edits`"]),
    ("model: [m]\nedits: [{ablate: 1}]\n", "spec.yaml:1: model", ["`model` must be a string"]),
    ("sae: [a, 3]\nedits: [{ablate: 1}]\n", "spec.yaml:1: sae[1]", ["string"]),
    ("- ablate: 1\n", "spec.yaml:1", ["a spec is a mapping", "edits"]),
    ("", "spec.yaml:1", ["empty spec"]),
    # malformed YAML: a SpecError with the line, never a yaml exception
    ("model: m\nedits:\n  - scale: 3\n    factor: [1\n", "spec.yaml:5", ["malformed YAML"]),
    ("model: m\nedits:\n  - scale: 3\n   factor: 1\n", "spec.yaml:4", ["malformed YAML"]),
    ("model: 'm\n", "spec.yaml:2", ["malformed YAML"]),
    ("edits:\n  - scale: 1\n    factor: !!int lots\n", "spec.yaml:3", ["malformed YAML", "lots"]),
    ("edits:\n  - scale: 1\n    scale: 2\n    factor: 1\n", "spec.yaml:3", ["duplicate key 'scale'", "line 2"]),
    ("edits:\n  - scale: 1\n    factor: !!python/object:os.system x\n", "spec.yaml:3", ["malformed YAML"]),
    ("model: m\x07\nedits: []\n", "spec.yaml:1", ["malformed YAML"]),
]


@pytest.mark.parametrize("text, where, words", BAD_YAML)
def test_yaml_errors_name_file_line_edit_and_field(text, where, words):
    error = spec_error(load_spec_text, text, "spec.yaml")
    assert error.where == where, str(error)
    for word in words:
        assert word in error.message, (word, error.message)


@pytest.mark.parametrize("op", [op for op in OPS if OPERATIONS[op].units != UNITS])
def test_units_message_lists_the_allowed_units_from_the_schema(op):
    bad = next(u for u in UNITS if u not in OPERATIONS[op].units)
    error = spec_error(load_spec_text, f"edits: [{{{op}: 1, {OPERATIONS[op].amount_key}: 1, units: {bad}}}]")
    assert f"{op} takes units {', '.join(OPERATIONS[op].units)}, not {bad!r}" in error.message


def test_edit_rejects_an_amount_too_large_for_a_float():
    with pytest.raises(SpecError, match="finite number"):
        Edit("add", feature=1, amount=10**400)
    with pytest.raises(SpecError, match="when.above"):
        Edit("clamp", feature=1, amount=1.0, when=Condition(2, 10**400))


# ---------------------------------------------------------------- parse_spec


def test_parse_spec_reads_dsl_text_with_model_sae_and_site():
    spec = parse_spec("suppress feature 4312 by 80%; ablate feature 12", model="m", sae="s", site="resid_post.3")
    assert spec == Spec(edits=(DSL_EXAMPLES["suppress feature 4312 by 80%"], DSL_EXAMPLES["ablate feature 12"]),
                        model="m", sae=("s",), site="resid_post.3")


def test_parse_spec_reads_files_and_overrides_without_mutating(tmp_path):
    path = tmp_path / "spec.yml"
    path.write_text(ISSUE_EXAMPLE)
    spec = parse_spec(str(path))
    assert spec == load_spec_text(ISSUE_EXAMPLE) and spec.base_dir == str(tmp_path)
    overridden = parse_spec(path, model="other", sae=["x", "y"])
    assert overridden.model == "other" and overridden.sae == ("x", "y") and overridden.edits == spec.edits
    assert overridden.base_dir == str(tmp_path)
    again = parse_spec(spec, site="resid_post.1")
    assert again.site == "resid_post.1" and spec.site is None and parse_spec(spec) is spec


def test_parse_spec_reads_a_dsl_file(tmp_path):
    path = tmp_path / "edits.steer"
    path.write_text("# my edits\nsuppress feature 4312 by 80%\nablate feature 12\n")
    assert parse_spec(str(path)).edits == (DSL_EXAMPLES["suppress feature 4312 by 80%"], DSL_EXAMPLES["ablate feature 12"])
    path.write_text("ablate feature 12\nablate feature x\n")
    assert spec_error(parse_spec, str(path)).where == f"{path}:2"


def test_parse_spec_missing_file_and_empty_text(tmp_path):
    error = spec_error(parse_spec, str(tmp_path / "nope.yaml"))
    assert "no such spec file" in error.message and error.where == str(tmp_path / "nope.yaml")
    assert "no such spec file" in spec_error(parse_spec, "edits.json").message
    assert "at least one edit" in spec_error(parse_spec, "# nothing here").message
    assert "no such spec file" in spec_error(load_spec_file, tmp_path / "gone.yaml").message


def test_yaml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("edits:\n  - scale: 3\n    factor: -1\n")
    assert str(spec_error(parse_spec, str(path))).startswith(f"{path}:3: edits[0].factor: ")


# ---------------------------------------------------------------- where an edit was written

def test_edits_keep_where_they_were_written_outside_their_value(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("sae: s\nedits:\n  - suppress: 1\n    by: 80%\n\n  - monitor: 4\n")
    spec = load_spec_file(path)
    assert [e.origin for e in spec.edits] == [f"{path}:3", f"{path}:6"]
    assert spec.edits[1].where(1) == f"{path}:6: edits[1] (monitor feature 4)"
    dsl = tmp_path / "spec.steer"
    dsl.write_text("# a comment\nsuppress feature 1 by 80%\n\nmonitor feature 4\n")
    assert [e.origin for e in parse_spec(str(dsl)).edits] == [f"{dsl}:2", f"{dsl}:4"]
    assert [e.origin for e in parse_dsl("monitor feature 4\nablate feature 2; ablate feature 3")] == [
        "line 1", "line 2", "line 2"]
    # an edit built in Python has no origin and is named as before
    built = Spec((Edit("scale", feature=1, amount=0.2), Edit("monitor", feature=4, amount=0.0)), sae=("s",))
    assert [e.origin for e in built.edits] == [None, None]
    assert built.edits[1].where(1) == "edits[1] (monitor feature 4)"
    # where an edit was written is not part of its value: equality, hashes, repr and dumps ignore it
    assert spec == built and hash(spec.edits) == hash(built.edits) and repr(spec.edits) == repr(built.edits)
    assert dump_spec(spec) == dump_spec(built) and spec_to_dict(spec) == spec_to_dict(built)
    assert format_dsl(spec.edits) == format_dsl(built.edits)
    # and it survives changes made with dataclasses.replace (sweeps, tuning)
    changed = dataclasses.replace(spec.edits[0], amount=0.5)
    assert changed.origin == f"{path}:3" and changed == Edit("scale", feature=1, amount=0.5)
    assert dataclasses.replace(spec, name="x").edits[1].origin == f"{path}:6"


def test_compile_errors_name_the_line_of_the_edit(tmp_path):
    from steer.plan import compile
    from tests.conftest import random_sae, tiny_model

    model, sae = tiny_model("llama"), dataclasses.replace(random_sae(), site="resid_post.1")
    text = "edits:\n  - monitor: 4\n  - scale: 24\n    factor: 0.5\n"
    error = spec_error(compile, load_spec_text(text, "spec.yaml"), model, sae)
    assert str(error) == "spec.yaml:3: edits[1] (scale feature 24): feature 24 is out of range: the SAE has d_sae=24 (ids 0..23)"
    error = spec_error(compile, "monitor feature 4\nclamp feature 2 to 0 when feature 30 above 1", model, sae)
    assert str(error).startswith("line 2: edits[1] (clamp feature 2): when.feature 30 is out of range")
    built = Spec((Edit("monitor", feature=4), Edit("scale", feature=24, amount=0.5)))
    error = spec_error(compile, built, model, sae)
    assert str(error) == "edits[1] (scale feature 24): feature 24 is out of range: the SAE has d_sae=24 (ids 0..23)"


# ---------------------------------------------------------------- round trips (hypothesis)

finite = st.floats(allow_nan=False, allow_infinity=False)
words = st.text(max_size=12)
directions = st.builds(lambda file, key: f"{file}:{key}", st.text(min_size=1, max_size=12),
                       st.text(min_size=1, max_size=8).filter(lambda key: ":" not in key))


@st.composite
def edits(draw) -> Edit:
    op = draw(st.sampled_from(OPS))
    on_feature = not OPERATIONS[op].directions or draw(st.booleans())
    target = {"feature": draw(st.integers(0, 2**40))} if on_feature else {"direction": draw(directions)}
    amounts = finite.filter(lambda a: a >= 0) if op in ("scale", "project_out") else finite
    if OPERATIONS[op].default is not None:
        amounts = st.none() | amounts
    units = [u for u in OPERATIONS[op].units if u != "feature" or on_feature]
    whens = [st.just("always")]
    if op != "monitor":
        whens.append(st.builds(Condition, st.integers(0, 2**20), finite))
        if on_feature:
            whens.append(st.just("active"))
    return Edit(
        op,
        amount=draw(amounts),
        units=draw(st.sampled_from(units)),
        when=draw(st.one_of(whens)),
        scope=draw(st.none() | st.sampled_from(SCOPES)),
        site=draw(st.none() | words),
        **target,
    )


specs = st.builds(
    Spec,
    edits=st.lists(edits(), min_size=1, max_size=4).map(tuple),
    model=st.none() | words,
    sae=st.lists(words, max_size=3).map(tuple),
    site=st.none() | words,
    scope=st.sampled_from(SCOPES),
    name=st.none() | words,
    description=st.none() | st.text(max_size=40),
)


@ROUND_TRIP
@given(specs)
def test_yaml_round_trip(spec):
    text = dump_spec(spec)
    again = load_spec_text(text)
    assert again == spec
    assert dump_spec(again) == text


@ROUND_TRIP
@given(specs)
def test_json_round_trip(spec):
    assert load_spec_text(json.dumps(spec_to_dict(spec))) == spec


@ROUND_TRIP
@given(st.lists(edits(), max_size=5).map(tuple))
def test_dsl_round_trip(some_edits):
    text = format_dsl(some_edits)
    assert parse_dsl(text) == some_edits
    assert format_dsl(parse_dsl(text)) == text


@pytest.mark.parametrize("text", [ISSUE_EXAMPLE, *[f"edits: [{t}]" for t in ("{ablate: 1}", "{steer: 'a:b', by: -2}")]])
def test_yaml_to_spec_to_yaml_to_spec(text):
    spec = load_spec_text(text)
    assert load_spec_text(dump_spec(spec)) == spec
    assert parse_dsl(format_dsl(spec.edits)) == spec.edits


# ---------------------------------------------------------------- fuzzing: SpecError or a result, nothing else


def parses_or_spec_error(call, *args):
    try:
        return call(*args)
    except SpecError as error:
        assert str(error)  # renders as one line
        return None


DSL_WORDS = ["scale", "suppress", "ablate", "amplify", "clamp", "steer", "add", "project", "out", "cap", "monitor",
             "feature", "direction", "by", "to", "at", "above", "units", "when", "scope", "site", "active", "always",
             "raw", "norm", "all", "prompt", "generation", "d.safetensors:k", "a:b", ":", "0", "12", "-3", "+4", "2x",
             "80%", "1e400", "1e-400", "0.5", "-0.0", "nan", "inf", "9" * 120, '"', '"q w"', '"\\q"', "#", ";", "\n"]


@FUZZ
@given(st.text())
def test_fuzz_dsl_arbitrary_text(text):
    result = parses_or_spec_error(parse_dsl, text)
    assert result is None or all(isinstance(e, Edit) for e in result)


@FUZZ
@given(st.lists(st.sampled_from(DSL_WORDS) | st.text(max_size=4), max_size=14),
       st.lists(st.sampled_from([" ", " ", "\n", ";", "\t", "", " # "]), min_size=14, max_size=14))
def test_fuzz_dsl_vocabulary(tokens, separators):
    text = "".join(token + separator for token, separator in zip(tokens, separators))
    result = parses_or_spec_error(parse_dsl, text)
    if result is not None:
        assert parse_dsl(format_dsl(result)) == result


YAML_PIECES = ["edits", "model", "sae", "scope", "site", "when", "units", "scale", "suppress", "steer", "add", "clamp",
               "monitor", "project_out", "cap", "by", "factor", "to", "strength", "fraction", "at", "above", "feature",
               "active", ":", ": ", "- ", "\n", "\n  ", "\n    ", "{", "}", "[", "]", ", ", "'", '"', "!!int ", "!!str ",
               "!!binary ", "!!float ", "!!set ", "!!omap ", "&a ", "*a", "<<: ", "%", "#", "---\n", "...\n", "1",
               "-1", "80%", "2x", "1e5", ".inf", ".nan", "null", "true", "2001-02-30", "a:b", "\t", "?", "|", ">"]


@FUZZ
@given(st.text())
def test_fuzz_yaml_arbitrary_text(text):
    result = parses_or_spec_error(load_spec_text, text)
    assert result is None or isinstance(result, Spec)


@FUZZ
@given(st.lists(st.sampled_from(YAML_PIECES), max_size=40).map("".join))
def test_fuzz_yaml_pieces(text):
    result = parses_or_spec_error(load_spec_text, text)
    assert result is None or load_spec_text(dump_spec(result)) == result


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.sampled_from(
    ["80%", "2x", "+4", "d.safetensors:k", "active", "always", "raw", "norm", "feature", "all", "prompt", "1e-3"])
keys = st.sampled_from(["edits", "model", "sae", "site", "scope", "name", "description", "when", "units", "feature",
                        "above", "by", "to", "at", "factor", "strength", "fraction", *OPS, "suppress", "ablate",
                        "amplify", "steer"]) | st.text(max_size=6) | st.integers()
structures = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
                          max_leaves=20)
spec_like = st.fixed_dictionaries(
    {"edits": st.lists(st.dictionaries(keys, scalars | st.dictionaries(keys, scalars, max_size=3), max_size=5),
                       max_size=3)},
    optional={"model": scalars, "sae": scalars | st.lists(scalars, max_size=2), "scope": scalars, "extra": structures},
)


@FUZZ
@given(structures | spec_like)
def test_fuzz_yaml_structures(data):
    result = parses_or_spec_error(load_spec_text, yaml.safe_dump(data, allow_unicode=True))
    if result is not None:
        assert load_spec_text(dump_spec(result)) == result
