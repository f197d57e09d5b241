"""The benchmark command prints the documented JSON schema (timings are not asserted)."""

from __future__ import annotations

import json

from layerdiff.cli import main

KEYS = {"preset", "layers", "batch", "size", "bare_ms_per_step", "cfg_ms_per_step", "smg_ms_per_step",
        "cfg_over_bare", "smg_over_cfg", "peak_mb_bare", "peak_mb_cfg"}


def test_bench_prints_results_json(capsys):
    assert main(["bench", "--preset", "tiny", "--layers", "2", "--steps", "2", "--rounds", "1", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["results"]
    assert KEYS <= set(row)
    assert row["preset"] == "tiny" and row["layers"] == 2 and row["params_added"] > 0
    assert row["bare_ms_per_step"] > 0 and row["cfg_over_bare"] > 0
    assert row["layout"] == "preset"


def test_bench_times_both_layouts_side_by_side(capsys):
    assert main(["bench", "--preset", "tiny", "--layers", "2", "--steps", "1", "--rounds", "1", "--threads", "1",
                 "--layout", "preset,paper"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["layout"] for r in rows] == ["preset", "paper"]
    assert rows[0]["params_added"] < rows[1]["params_added"]  # the preset's layout is the slimmer one


def test_bench_bad_arguments(capsys):
    assert main(["bench", "--layers", "two"]) == 1
    assert "--layers" in capsys.readouterr().err
    assert main(["bench", "--preset", "nope", "--layers", "2"]) == 1
    assert "unknown preset" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--layers", "2", "--layout", "wide"]) == 1
    assert "--layout 'wide'" in capsys.readouterr().err


def test_bench_builds_both_unets_on_the_requested_device():
    # `bench --device cuda` once built the LayerDiff UNet on the CPU (an outer torch.device context
    # does not reach into LayerDiffUNet.from_config) and failed at its first step on a GPU; the meta
    # device shows the same without one
    from layerdiff.config import get_preset
    from layerdiff.evaluation.bench import build_unets

    for preset in ("tiny", "toy"):
        bare, layered = build_unets(get_preset(preset), "meta")
        devices = {p.device.type for m in (bare, layered) for p in m.parameters()}
        assert devices == {"meta"}, (preset, devices)


def test_the_timed_layerdiff_unet_has_open_gates_like_a_trained_one():
    """A closed (zero) intra-layer gate skips its attention; the benchmark must time the trained case."""
    import torch

    from layerdiff.config import get_preset
    from layerdiff.evaluation.bench import build_unets

    _, layered = build_unets(get_preset("tiny"), torch.device("cpu"))
    gates = [m for m in layered.modules() if hasattr(m, "closed")]
    assert gates and not any(m.closed() for m in gates)
