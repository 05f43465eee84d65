"""Fixtures shared by several test modules."""

import pytest


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A digits classification teacher, trained once per module that asks for it."""
    from _cls_utils import train_teacher

    return train_teacher(tmp_path_factory.mktemp("teacher"))
