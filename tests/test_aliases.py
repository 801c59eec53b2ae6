"""Names that moved in the restructure keep a deprecated alias for one release."""
import importlib

import pytest

MOVED = [("scm_fast.sample", "build_network", "scm_fast.models"),
         ("scm_fast.sample", "load_run", "scm_fast.runs"),
         ("scm_fast.sample", "resolve_checkpoint", "scm_fast.runs"),
         ("scm_fast.config", "estimate_memory", "scm_fast.train.dry_run"),
         ("scm_fast.config", "format_bytes", "scm_fast.train.dry_run"),
         ("scm_fast.train", "LossScaler", "scm_fast.train.build"),
         ("scm_fast.train", "make_optimizer", "scm_fast.train.build"),
         ("scm_fast.train", "parse_faults", "scm_fast.train.faults"),
         ("scm_fast.train", "saved_activation_bytes", "scm_fast.train.dry_run")]


@pytest.mark.parametrize("old, name, new", MOVED)
def test_moved_name_warns_and_is_the_same_object(old, name, new):
    with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to {new}.{name}"):
        got = getattr(importlib.import_module(old), name)
    assert got is getattr(importlib.import_module(new), name)


def test_unknown_names_still_raise_attribute_error():
    for module in ("scm_fast.sample", "scm_fast.config", "scm_fast.train"):
        with pytest.raises(AttributeError, match="no_such_name"):
            getattr(importlib.import_module(module), "no_such_name")
