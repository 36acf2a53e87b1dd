"""``dla inspect`` shows what the paper's policy saw: the scores I_t, the learned τ per head and the
densities of the cached segments, equal to what the layers planned."""

import json

import pytest
import torch

import dla
from dla.inspection import final_segments, inspect_model, layer_schedules


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = dla.DLAConfig(mixer="mamba2", vocab_size=32, hidden_size=32, num_hidden_layers=2, head_dim=16,
                           state_size=8, capacity=5, threshold=0.4)
    m = dla.DLAForCausalLM(config).eval()
    with torch.no_grad():
        m.model.layers[1].mixer.threshold.copy_(torch.tensor([0.3, 0.5, 0.7, 0.9]))  # as if learned
    return m


def test_inspect_reports_scores_thresholds_and_densities(model, tmp_path):
    ids = torch.randint(0, 32, (1, 60)).tolist()[0]
    report = inspect_model(model, ids, str, tmp_path, "random tokens")
    assert json.loads((tmp_path / "inspect.json").read_text()) == report
    layers = layer_schedules(model, torch.tensor([ids]))
    for layer, entry in zip(layers.values(), report["layers"]):
        assert (entry["score"], entry["merge"]) == ("state", "density")
        schedule = layer["schedule"]
        for h, head in enumerate(entry["heads"]):
            assert head["threshold"] == pytest.approx(layer["threshold"][h])
            assert head["scores"] == pytest.approx(schedule.scores[0, h].tolist())
            opened = [t for t in range(1, 60) if head["scores"][t] >= head["threshold"]]
            assert head["opened"] == [0] + opened  # a state opens exactly where I_t >= τ
            segments = head["segments"]
            assert sum(s["length"] for s in segments) == 60 and segments[0]["start"] == head["opened"][-1]
            for s in segments:  # Ī is the sum of the scores of the segment's tokens
                total = sum(head["scores"][s["start"]:s["start"] + s["length"]])
                assert s["information"] == pytest.approx(total, abs=1e-5)
                assert s["density"] == pytest.approx(total / s["length"], abs=1e-5)
    assert [h["threshold"] for h in report["layers"][1]["heads"]] == pytest.approx([0.3, 0.5, 0.7, 0.9])
    page = (tmp_path / "inspect.html").read_text()
    assert "<th>τ</th>" in page and "densities" in page


def test_boundary_stats_report_the_learned_thresholds(model):
    from dla.inspection import boundary_stats

    stats = boundary_stats(model, torch.randint(0, 32, (2, 40)))
    assert [s["threshold"] for s in stats][1] == pytest.approx([0.3, 0.5, 0.7, 0.9])
    assert all(s["births_per_100_tokens"] >= 0 for s in stats)


def test_final_segments_follow_the_schedule():
    k = torch.randn(1, 40, 1, 4)
    s = dla.plan_schedule("dynamic", batch=1, heads=1, length=40, k=k, v=torch.randn(1, 40, 1, 3),
                          g=-torch.rand(1, 40, 1), capacity=3, threshold=1.0)
    segments = final_segments(s, 0)
    assert [x["start"] for x in segments] == [a for a in s.final.starts[0, 0].tolist() if a >= 0]
    assert sum(x["length"] for x in segments) == 40
