"""device_sections: a check that raises is recorded as failed while the others run (and the report
shows it failed); a GPU's device_kind names the AOT tool's shipped description."""

import pytest

from nanogpt_jax import device_check, device_sections


def test_a_check_that_raises_is_failed_and_the_others_still_run(monkeypatch):
    def broken(shapes, dtype):
        raise RuntimeError("kernel exploded\nsecond line")

    def fine(shapes, dtype):
        return {"compared": "x vs x", "passed": True, "max_abs_error": 0.0, "rel_error": 0.0, "tolerance": 0}

    monkeypatch.setattr(device_sections, "planned_checks", lambda platform: [("broken", "float32", broken),
                                                                            ("fine", "float32", fine)])
    bad, good = device_sections.run_checks(device_sections.QUICK)
    assert bad["passed"] is False and bad["error"] == "RuntimeError: kernel exploded"
    assert good["passed"] is True and good["status"] == "ok"
    cells = device_check._check_cells(bad)
    assert cells["result"] == "**FAIL**" and cells["note"] == "RuntimeError: kernel exploded"


@pytest.mark.parametrize("kind, expected", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                            ("NVIDIA GH200 480GB", "h100"), ("NVIDIA A100-SXM4-40GB", "a100-40g"),
                                            ("NVIDIA A100-SXM4-80GB", "a100")])
def test_gpu_kind_names_the_aot_tools_shipped_description(kind, expected):
    assert device_sections._gpu_kind(kind) == expected
