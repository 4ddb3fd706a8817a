"""The loader of the model the project trains (``bench/train_tiny.py``, shipped under
``distripy/pipelines/models/tiny-shapes``): without the model it says which command makes it."""

import pytest


def test_a_missing_model_names_the_command_that_makes_it(monkeypatch, tmp_path):
    import distripy.pipelines.tiny as tiny
    from distripy.errors import InputError

    monkeypatch.setattr(tiny, "TRAINED_MODEL", tmp_path / "nothing-here")
    with pytest.raises(InputError, match="bench/train_tiny.py"):
        tiny.trained_sdxl_pipeline()
