"""Bit rot: random single-bit flips, truncations and extensions of every file of a checkpoint are
detected before any value reaches the model, and the previous valid checkpoint is used.
The bounded version of scripts/bitrot.py."""

from __future__ import annotations

import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))

import bitrot


@pytest.mark.kind("chaos")
def test_random_damage_to_any_file_is_detected_before_the_model_is_touched(tmp_path):
    report = bitrot.run(300, seed=15, work=str(tmp_path))
    assert report["failed"] == 0, report["failures"]
    assert report["detected"] + report["harmless"] == 300
    files = {k.split(":")[0] for k in report["by_file_and_damage"]}
    kinds = {k.split(":")[1] for k in report["by_file_and_damage"]}
    assert files == {"manifest.json", "state.json", "tensors.safetensors"} and kinds == {"flip", "truncate", "extend"}
