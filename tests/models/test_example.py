"""The example script runs and learns."""

import runpy
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune_mam.py"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_finetune_mam_example(arch, capsys):
    module = runpy.run_path(str(EXAMPLE))
    result = module["main"](["--arch", arch, "--steps", "20", "--log-every", "10"])
    out = capsys.readouterr().out
    assert out.startswith("trainable params: ")
    assert "steps/s" in out and "tokens/s" in out and "step   20  loss" in out
    assert result["losses"][-1] < 0.8 * result["losses"][0]
    assert result["tokens_per_s"] > 0
