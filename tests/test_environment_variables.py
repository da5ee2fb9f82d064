"""Parsing of the DESAM_* variables that are not integers."""

import pytest

from nnunetv2_desam.environment_variables import LEARNING_RATE_VARIABLE, learning_rate_from_environment
from nnunetv2_desam.errors import ConfigurationError


def test_learning_rate_defaults_to_the_given_one_and_reads_positive_numbers():
    assert learning_rate_from_environment(1e-4, {}) == 1e-4
    assert learning_rate_from_environment(1e-4, {LEARNING_RATE_VARIABLE: ""}) == 1e-4
    assert learning_rate_from_environment(1e-4, {LEARNING_RATE_VARIABLE: " 3e-3 "}) == 3e-3


@pytest.mark.parametrize("value", ["0", "-1e-3", "fast", "nan", "inf"])
def test_learning_rate_refuses_anything_but_a_positive_number(value):
    with pytest.raises(ConfigurationError, match=f"{LEARNING_RATE_VARIABLE} must be a positive number"):
        learning_rate_from_environment(1e-4, {LEARNING_RATE_VARIABLE: value})
