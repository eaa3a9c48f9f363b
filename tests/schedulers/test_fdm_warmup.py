import pytest
import torch

from diffusers_stages.schedulers import FDMLossWarmup


def reference_clamps(start, end, warmup_steps, n):
    """FDM: c starts at `start`, is multiplied by (end / start) ** (1 / warmup_steps) per step; removed once >= end."""
    c, out = start, []
    for _ in range(n):
        out.append(c if c < end * (1 - 1e-9) else None)
        c *= (end / start) ** (1 / warmup_steps)
    return out


def test_sequence_5_to_500_then_off():
    warmup = FDMLossWarmup(5.0, 500.0, warmup_steps=200)
    seen = []
    for _ in range(210):
        seen.append(warmup.clamp_value)
        warmup.step()
    want = reference_clamps(5.0, 500.0, 200, 210)
    assert [c is None for c in seen] == [c is None for c in want]
    assert seen[0] == 5.0 and seen[199] == pytest.approx(500 / 100 ** (1 / 200)) and seen[200] is None
    torch.testing.assert_close(torch.tensor(seen[:200]), torch.tensor(want[:200], dtype=torch.float32))


def test_call_clamps_then_passes_through():
    warmup = FDMLossWarmup(warmup_steps=2)
    weight = torch.tensor([1.0, 8.0, 1e4])
    torch.testing.assert_close(warmup(weight), torch.tensor([1.0, 5.0, 5.0]))
    warmup.step()
    torch.testing.assert_close(warmup(weight), torch.tensor([1.0, 8.0, 50.0]))
    warmup.step()
    assert warmup.finished and torch.equal(warmup(weight), weight)


def test_resume_continues_where_it_was():
    uninterrupted, first = FDMLossWarmup(warmup_steps=50), FDMLossWarmup(warmup_steps=50)
    for _ in range(30):
        uninterrupted.step()
        first.step()
    state = first.state_dict()
    resumed = FDMLossWarmup(warmup_steps=50)
    resumed.load_state_dict(state)
    for _ in range(25):
        assert resumed.clamp_value == uninterrupted.clamp_value
        resumed.step()
        uninterrupted.step()
    assert resumed.clamp_value is None and resumed.num_steps == 55


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(start=0.0), "`start`"), (dict(end=5.0), "`end`"), (dict(warmup_steps=0), "`warmup_steps`")],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FDMLossWarmup(**kwargs)


def test_load_mismatched_state_raises():
    with pytest.raises(ValueError, match="warmup_steps"):
        FDMLossWarmup(warmup_steps=10).load_state_dict(FDMLossWarmup(warmup_steps=20).state_dict())
    with pytest.raises(ValueError, match="num_steps"):
        FDMLossWarmup().load_state_dict({"num_steps": -1})
