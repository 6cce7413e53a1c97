"""The smooth (RBF) distance features option of the config."""

from __future__ import annotations

import pytest

from ipa_export import ConfigCompatibilityError, EncoderConfig


def test_rbf_config():
    config = EncoderConfig(distance_features="rbf", num_rbf=24)
    assert config.num_distance_features == 24 and EncoderConfig().num_distance_features == 22
    with pytest.raises(ConfigCompatibilityError, match="distance_features: 'rbf' needs mode 'flash_1d_bias'"):
        EncoderConfig(distance_features="rbf", mode="flash_no_bias", z_factor_rank=0)
    with pytest.raises(ConfigCompatibilityError, match=r"distance_features: must be one of \['one_hot', 'rbf'\]"):
        EncoderConfig(distance_features="gaussian")
    fields = EncoderConfig().to_dict()
    del fields["distance_features"], fields["num_rbf"]  # an export written before these fields
    assert EncoderConfig.from_dict(fields) == EncoderConfig()
