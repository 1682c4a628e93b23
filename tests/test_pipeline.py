"""Pipeline text, pass options and presets: what parses, what each error says."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flagtree.errors import OptionsError
from flagtree.passes import Pass, all_passes, get_pass, parse_pipeline, preset_pipeline, register_pass
from flagtree.passes import base as pass_base
from flagtree.passes.base import format_option_value


@dataclass(frozen=True)
class OptionKinds(Pass):
    """A test pass with one option of each kind."""

    name: ClassVar[str] = "test-option-kinds"
    count: int = 1
    ratio: float = 0.5
    enabled: bool = False
    label: str = "none"
    sizes: tuple[int, ...] = ()
    weights: tuple[float, ...] = (1.0,)
    names: tuple[str, ...] = ()

    def run(self, module) -> bool:
        return False


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the pass registry holding the real passes and `test-option-kinds`."""
    monkeypatch.setattr(pass_base, "_PASSES", dict(pass_base._PASSES))
    register_pass(OptionKinds)


def names(text: str) -> list[str]:
    return [p.pipeline_text() for p in parse_pipeline(text)]


# ------------------------------------------------------------------------ valid text


@pytest.mark.parametrize("text, expected", [
    ("", []),
    ("   ", []),
    ("cse", ["cse"]),
    ("canonicalize,cse,dce", ["canonicalize{max-iterations=10}", "cse", "dce"]),
    (" canonicalize { max-iterations = 3 } ,  cse ", ["canonicalize{max-iterations=3}", "cse"]),
    ("fold{max-elements=16},fold", ["fold{max-elements=16}", "fold{max-elements=1024}"]),
    ("canonicalize{}", ["canonicalize{max-iterations=10}"]),
])
def test_pipelines_parse(text, expected):
    assert names(text) == expected


@pytest.mark.usefixtures("registry")
def test_options_separated_by_spaces_or_commas_are_the_same():
    spaced = parse_pipeline("test-option-kinds{count=3 ratio=2 enabled=true label=bf16 sizes=[1,2]}")
    commas = parse_pipeline("test-option-kinds{count=3,ratio=2,enabled=true,label=bf16,sizes=[1, 2]}")
    mixed = parse_pipeline("test-option-kinds{count=3, ratio=2 enabled=true,label=bf16 sizes=[1,2]}")
    expected = OptionKinds(count=3, ratio=2.0, enabled=True, label="bf16", sizes=(1, 2))
    assert spaced == commas == mixed == [expected]


@pytest.mark.usefixtures("registry")
@pytest.mark.parametrize("text, field, value", [
    ("count=-7", "count", -7),
    ("ratio=1.5", "ratio", 1.5),
    ("ratio=1e-3", "ratio", 1e-3),
    ("ratio=-2.5E+2", "ratio", -250.0),
    ("ratio=3", "ratio", 3.0),
    ("ratio=-inf", "ratio", -math.inf),
    ("enabled=true", "enabled", True),
    ("label=sm_90", "label", "sm_90"),
    ("label=a.b-c", "label", "a.b-c"),
    ("label=trueish", "label", "trueish"),
    ('label="x, y {z}"', "label", "x, y {z}"),
    (r'label="say \"hi\" \\ bye"', "label", 'say "hi" \\ bye'),
    ('label="true"', "label", "true"),
    ("sizes=[]", "sizes", ()),
    ("sizes=[4,-1, 2]", "sizes", (4, -1, 2)),
    ("weights=[1, 0.5]", "weights", (1.0, 0.5)),
    ('names=[a, "b c"]', "names", ("a", "b c")),
])
def test_option_values(text, field, value):
    (built,) = parse_pipeline(f"test-option-kinds{{{text}}}")
    assert getattr(built, field) == value
    assert type(getattr(built, field)) is type(value)


@pytest.mark.usefixtures("registry")
def test_nan_option_value():
    (built,) = parse_pipeline("test-option-kinds{ratio=nan}")
    assert math.isnan(built.ratio)


option_values = st.fixed_dictionaries({
    "count": st.integers(-(2**40), 2**40),
    "ratio": st.floats(allow_nan=False),
    "enabled": st.booleans(),
    "label": st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=12),
    "sizes": st.lists(st.integers(-100, 100), max_size=4).map(tuple),
    "weights": st.lists(st.floats(allow_nan=False), max_size=3).map(tuple),
    "names": st.lists(st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=5),
                      max_size=3).map(tuple),
})


@pytest.mark.usefixtures("registry")
@given(option_values)
def test_pipeline_text_parses_back_to_the_same_pass(options):
    built = OptionKinds(**options)
    assert parse_pipeline(built.pipeline_text()) == [built]
    assert parse_pipeline(f"cse,{built.pipeline_text()},dce")[1] == built


def test_every_registered_pass_round_trips_with_defaults():
    for pass_class in all_passes().values():
        assert parse_pipeline(pass_class().pipeline_text()) == [pass_class()]


# ------------------------------------------------------------------------ syntax errors


@pytest.mark.parametrize("text, column, message", [
    ("canonicalize{", 14, "expected '}' or an option name, found end of input"),
    ("cse,", 5, "expected a pass name, found end of input"),
    (",cse", 1, "expected a pass name"),
    ("cse dce", 5, "found 'dce'"),
    ("fold{max-elements}", 18, "expected '='"),
    ("fold{max-elements=}", 19, "expected a value, found '}'"),
    ("fold{max-elements=[1,}", 22, "expected a value, found '}'"),
    ("fold{max-elements=$}", 19, "unexpected character '$'"),
    ('fold{label="open}', 12, "unexpected character '\"'"),
])
def test_syntax_errors_name_the_column_and_what_was_expected(text, column, message):
    with pytest.raises(OptionsError) as error:
        parse_pipeline(text)
    text_of_error = str(error.value)
    assert "\n" not in text_of_error
    assert f"column {column}:" in text_of_error and message in text_of_error


# ---------------------------------------------------------------------- option errors


def test_unknown_pass_lists_the_valid_names_and_a_suggestion():
    with pytest.raises(OptionsError, match="column 5: unknown pass 'canonicalise'") as error:
        parse_pipeline("cse,canonicalise")
    message = str(error.value)
    assert "did you mean 'canonicalize'?" in message
    assert all(name in message for name in ("canonicalize", "cse", "dce", "fold", "O0", "O3"))


def test_get_pass_of_an_unknown_name_lists_the_valid_names():
    with pytest.raises(OptionsError, match=r"^unknown pass 'nope'; valid passes: ") as error:
        get_pass("nope")
    assert all(name in str(error.value) for name in all_passes())


def test_unknown_option_lists_the_pass_options():
    with pytest.raises(OptionsError) as error:
        parse_pipeline("canonicalize{max_iterations=3}")
    message = str(error.value)
    assert "column 14" in message and "no option 'max_iterations'" in message
    assert "did you mean 'max-iterations'?" in message and "valid options: max-iterations" in message


def test_option_of_a_pass_without_options():
    with pytest.raises(OptionsError, match="'cse' takes no options"):
        parse_pipeline("cse{aggressive=true}")


@pytest.mark.usefixtures("registry")
@pytest.mark.parametrize("text, message", [
    ("count=1.5", "option 'count' expects an integer, got 1.5"),
    ("count=true", "option 'count' expects an integer, got true"),
    ("enabled=1", "option 'enabled' expects true or false, got 1"),
    ("ratio=fast", "option 'ratio' expects a number, got fast"),
    ("label=3", "option 'label' expects a string, got 3"),
    ("sizes=3", "option 'sizes' expects a list of integers, got 3"),
    ("sizes=[1,x]", "option 'sizes' expects a list of integers, got [1,x]"),
])
def test_option_type_errors_name_the_option_and_the_type(text, message):
    with pytest.raises(OptionsError, match="column 19") as error:
        parse_pipeline(f"test-option-kinds{{{text}}}")
    assert message in str(error.value)


def test_option_given_twice():
    with pytest.raises(OptionsError, match="column 21: option 'max-elements' is given twice"):
        parse_pipeline("fold{max-elements=1 max-elements=2}")


@pytest.mark.parametrize("text, message", [
    ("canonicalize{max-iterations=0}", "max-iterations must be at least 1"),
    ("fold{max-elements=-1}", "max-elements must not be negative"),
])
def test_option_range_errors(text, message):
    with pytest.raises(OptionsError, match=message):
        parse_pipeline(text)


def test_format_option_value_quotes_what_would_read_back_differently():
    assert [format_option_value(v) for v in ("bf16", "true", "1", "a b", "inf", "")] == [
        "bf16", '"true"', '"1"', '"a b"', '"inf"', '""']


# --------------------------------------------------------------------------- presets


def test_presets():
    assert preset_pipeline(0) == ""
    assert preset_pipeline(1) == "canonicalize,cse,dce"
    assert preset_pipeline(2) == "canonicalize,fold,cse,dce,fuse-attention,canonicalize"
    assert preset_pipeline(3) == preset_pipeline(2)  # until O3-only fusion passes land


@pytest.mark.parametrize("level", [-1, 4, True, "2"])
def test_unknown_optimization_level(level):
    with pytest.raises(OptionsError, match="valid levels: 0, 1, 2, 3"):
        preset_pipeline(level)


@pytest.mark.parametrize("level", range(4))
def test_presets_expand_inside_pipelines(level):
    assert names(f"O{level},dce") == [*names(preset_pipeline(level)), "dce"]


def test_preset_takes_no_options():
    with pytest.raises(OptionsError, match="column 5: preset 'O2' takes no options"):
        parse_pipeline("cse,O2{x=1}")


# -------------------------------------------------------------------------- registry


def test_registry_holds_the_generic_passes():
    assert {"canonicalize", "cse", "dce", "fold"} <= set(all_passes())
    assert list(all_passes()) == sorted(all_passes())
    assert get_pass("cse")().name == "cse"


@pytest.mark.usefixtures("registry")
def test_register_pass_rejects_malformed_passes():
    class NotADataclass(Pass):
        name = "test-plain"

    @dataclass(frozen=True)
    class BadName(Pass):
        name: ClassVar[str] = "Test_Bad"

    @dataclass(frozen=True)
    class SameName(Pass):
        name: ClassVar[str] = "cse"

    @dataclass(frozen=True)
    class DictOption(Pass):
        name: ClassVar[str] = "test-dict-option"
        table: dict = None

    @dataclass(frozen=True)
    class NoDefault(Pass):
        name: ClassVar[str] = "test-no-default"
        count: int

    for cls, error in [(NotADataclass, TypeError), (BadName, ValueError),
                       (SameName, ValueError), (DictOption, TypeError), (NoDefault, TypeError)]:
        with pytest.raises(error):
            register_pass(cls)
        assert all_passes().get(cls.name) is not cls


def test_describe_shows_defaults_and_summary():
    assert get_pass("fold").describe().startswith("fold{max-elements=1024}: Evaluate ops")
