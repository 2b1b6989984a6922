"""The method registry: every method is a module with a Method class; options become flags.

The options are read from each module's source without importing it (so `--help` stays free of
TensorFlow); a made-up method module written here checks the reading, the flag plumbing and the
errors for an option given to the wrong method.
"""

import subprocess
import sys
import textwrap

import pytest
from absl import flags

from imcl_tf import methods, train
from imcl_tf.methods import registry
from imcl_tf.methods.base import Method
from imcl_tf.training.config import TrainConfig

FAKE_MODULE = textwrap.dedent('''
    """A made-up method, for the registry's tests."""
    import no_such_module_so_importing_this_fails  # options must be read without importing

    OPTIONS = (
        ("fake_pairs", 5, "Pairs per image (0: all).", None),
        ("fake_mode", "hard", "Which pairs.", ("hard", "soft")),
        ("fake_weight", 0.5, "Weight of the term.", None),
    )
''')


@pytest.fixture
def fake_method(tmp_path, monkeypatch):
    (tmp_path / "fake_method_module.py").write_text(FAKE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    methods_with_fake = dict(registry.METHODS)
    methods_with_fake["fake"] = registry.MethodEntry("fake_method_module", "A test method.",
                                                     "nobody")
    monkeypatch.setattr(registry, "METHODS", methods_with_fake)
    registry.options.cache_clear()
    yield
    registry.options.cache_clear()


def test_every_registered_method_is_a_method_class_with_literal_options():
    for name in registry.names():
        cls = methods.get(name)
        assert issubclass(cls, Method) and cls.NAME == name, name
        assert cls.TERMS and len(set(cls.TERMS)) == len(cls.TERMS), name
        assert "loss" not in cls.TERMS, name  # "loss" is always logged, once
        module = sys.modules[registry.entry(name).module]
        assert tuple(o[0] for o in module.OPTIONS) == tuple(o.name for o in registry.options(name))
        for option in registry.options(name):
            assert option.name.startswith(name + "_") and len(option.help) > 10, option


def test_options_are_read_without_importing_the_module(fake_method):
    options = registry.options("fake")
    assert [(o.name, o.default, o.choices) for o in options] == [
        ("fake_pairs", 5, None), ("fake_mode", "hard", ("hard", "soft")),
        ("fake_weight", 0.5, None)]
    assert "no_such_module_so_importing_this_fails" not in sys.modules
    assert registry.option_defaults("fake") == {"fake_pairs": 5, "fake_mode": "hard",
                                                "fake_weight": 0.5}


def test_an_option_without_the_method_prefix_is_refused(tmp_path, monkeypatch, fake_method):
    (tmp_path / "fake_method_module.py").write_text(
        'OPTIONS = (("pairs", 5, "Pairs per image.", None),)\n')
    registry.options.cache_clear()
    with pytest.raises(ValueError, match="option 'pairs' must start with 'fake_'"):
        registry.options("fake")


def test_method_options_become_flags_and_reach_the_config(fake_method):
    flag_values = flags.FlagValues()
    train.define_flags(flag_values)
    assert flag_values["fake_pairs"].default == 5
    assert list(flag_values["fake_mode"].parser.enum_values) == ["hard", "soft"]
    assert "[--method=fake]" in flag_values["fake_weight"].help
    train.parse_flags(["train", "--fake_pairs=9", "--fake_mode=soft"], flag_values)
    config = train.config_from_flags(flag_values)
    # Only the options given on the command line; the others take their defaults when read.
    assert config.method_options == {"fake_pairs": 9, "fake_mode": "soft"}


@pytest.mark.parametrize("method,options,message", [
    ("logistic", {"fake_pairs": 3}, r"--fake_pairs: is an option of --method=fake, not of "
                                    r"--method=logistic"),
    ("fake", {"fake_mode": "medium"}, r"--fake_mode: must be one of hard, soft"),
    ("fake", {"fake_pairs": "many"}, r"--fake_pairs: must be a int"),
    ("fake", {"fake_pairs": True}, r"--fake_pairs: must be a int"),
    ("fake", {"nobody_knows": 1}, r"--nobody_knows: is not an option of any method"),
])
def test_bad_method_options_are_refused(fake_method, method, options, message):
    config = TrainConfig(data_dir="d", model_dir="m", method=method, method_options=options)
    with pytest.raises(ValueError, match=message):
        config._validate_method_options()


def test_a_required_option_must_be_given(tmp_path, fake_method):
    (tmp_path / "fake_method_module.py").write_text(
        'OPTIONS = (("fake_table", "", "A .npy of one row per class.", None, "required"),)\n')
    registry.options.cache_clear()
    assert registry.options("fake")[0].required
    for options in ({}, {"fake_table": ""}):
        config = TrainConfig(data_dir="d", model_dir="m", method="fake", method_options=options)
        with pytest.raises(ValueError, match=r"^--fake_table: is required with --method=fake: "
                                             r"A \.npy of one row per class\.$"):
            config._validate_method_options()
    TrainConfig(data_dir="d", model_dir="m", method="fake",
                method_options={"fake_table": "t.npy"})._validate_method_options()
    TrainConfig(data_dir="d", model_dir="m", method="logistic")._validate_method_options()


def test_an_option_marked_other_than_required_is_refused(tmp_path, fake_method):
    (tmp_path / "fake_method_module.py").write_text(
        'OPTIONS = (("fake_table", "", "A table.", None, "mandatory"),)\n')
    registry.options.cache_clear()
    with pytest.raises(ValueError, match=r"option 'fake_table': the fifth entry may only be "
                                         r"'required', received \['mandatory'\]"):
        registry.options("fake")


def test_a_float_option_takes_an_integer(fake_method):
    TrainConfig(data_dir="d", model_dir="m", method="fake",
                method_options={"fake_weight": 1})._validate_method_options()


def test_reading_every_option_imports_no_tensorflow():
    probe = ("import sys; from imcl_tf.methods import registry; registry.all_options(); "
             "print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_unknown_method_name_is_explained():
    with pytest.raises(ValueError, match=r"unknown method 'boosting'; choose one of"):
        registry.get("boosting")
