"""One run specification (refseg.runtime.run_spec.RunSpec): one override parser, one seeding rule, a dict round
trip, and the same networks wherever it is built (the CLI, the plugin and every device worker build from it)."""

import json

import pytest
import torch

from refseg import PAPER, PRESETS, MemoryBank
from refseg.runtime.run_spec import RunSpec, RunSpecError, format_overrides, parse_overrides
from refseg.testing import ColorEncoder

TOY = dict(proposer="refseg.testing:ColorRegionProposer", encoder="refseg.testing:ColorEncoder")


def test_override_text_forms_parse_alike():
    text = "merge.top_k=50, proposal.image_size=512;merge.merge_resolution=none\nprecision=bf16"
    pairs = (("merge.top_k", "50"), ("proposal.image_size", "512"), ("merge.merge_resolution", "none"),
             ("precision", "bf16"))
    assert parse_overrides(text) == pairs
    assert parse_overrides(["merge.top_k=50", "proposal.image_size=512", "merge.merge_resolution=none",
                            "precision=bf16"]) == pairs  # --set given four times
    assert parse_overrides(dict(pairs)) == pairs
    assert parse_overrides(list(pairs)) == pairs
    assert parse_overrides(None) == parse_overrides("") == ()
    # the setting's own type reads the text: the same config as typed values
    cfg = RunSpec(overrides=text).config()
    assert cfg == RunSpec(overrides={"merge.top_k": 50, "proposal.image_size": 512, "merge.merge_resolution": None,
                                     "precision": "bf16"}).config()
    assert (cfg.merge.top_k, cfg.proposal.image_size, cfg.merge.merge_resolution) == (50, 512, None)
    assert parse_overrides(format_overrides(cfg_pairs := (("merge.top_k", 50), ("merge.merge_resolution", None)))) \
        == (("merge.top_k", "50"), ("merge.merge_resolution", "none"))
    assert RunSpec(overrides=cfg_pairs).config() == RunSpec(overrides=format_overrides(cfg_pairs)).config()


@pytest.mark.parametrize("overrides, message", [
    ("merge.top_kk=50", "unknown setting 'top_kk'"),
    ("merge.top_k=fifty", "setting merge.top_k must be a positive integer"),
    ("merge.top_k=-5", "setting merge.top_k must be a positive integer"),
    ("merge.top_k", "not of the form key=value"),
    ("=3", "not of the form key=value"),
])
def test_bad_overrides_are_refused_where_written(overrides, message):
    with pytest.raises(RunSpecError, match=message):
        RunSpec(overrides=overrides)


def test_unknown_preset_and_fields_are_refused():
    with pytest.raises(RunSpecError, match="unknown preset 'papr'; choose one of default, paper, fast"):
        RunSpec(preset="papr")
    with pytest.raises(RunSpecError, match="unknown run setting"):
        RunSpec().with_changes(proposr="x")
    with pytest.raises(RunSpecError, match="unknown run setting"):
        RunSpec.from_dict({**RunSpec().to_dict(), "colour": "red"})
    with pytest.raises(RunSpecError, match="encoder input size"):
        RunSpec(encoder_input_size=0)


def test_presets_and_paper_models():
    spec = RunSpec(preset="paper")
    assert spec.config() == PAPER
    assert (spec.proposer, spec.encoder) == ("sam2_hiera_l", "dinov2_vitl14")  # the paper's models
    for name in PRESETS:
        assert RunSpec(preset=name).config() == PRESETS[name]


def test_dict_round_trip_is_json_and_exact(tmp_path):
    spec = RunSpec(**TOY, preset="fast", overrides="merge.top_k=7", encoder_input_size=224,
                   proposer_checkpoint=tmp_path / "p.pt", random_init=True, seed=3)
    data = json.loads(json.dumps(spec.to_dict()))
    assert RunSpec.from_dict(data) == spec
    assert data["proposer_checkpoint"] == str(tmp_path / "p.pt")
    # a record written by an older plugin (ModelSettings: the same names, fewer of them) still reads
    old = {"proposer": "sam2_hiera_t", "encoder": "dinov2_vits14", "preset": "paper", "overrides": [["merge.top_k", 5]],
           "encoder_input_size": 518, "proposer_checkpoint": None, "encoder_checkpoint": None, "random_init": False}
    assert RunSpec.from_dict(old).config().merge.top_k == 5


def test_with_changes_keeps_fields_given_as_none():
    spec = RunSpec(**TOY, preset="fast")
    assert spec.with_changes(preset=None, encoder="", proposer_checkpoint=None) == spec
    assert spec.with_changes(preset="paper").preset == "paper"


def test_random_weights_are_the_same_networks_everywhere_and_leave_the_global_rng_alone():
    spec = RunSpec(proposer="sam2.1_hiera_t", encoder="dinov2_vits14", random_init=True, encoder_input_size=56)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = spec.build_encoder("cpu")
    assert torch.equal(torch.random.get_rng_state(), before)  # forked: the caller's random stream is untouched
    b = spec.build_encoder("cpu")
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name
    other = spec.with_changes(seed=1).build_encoder("cpu")
    assert not all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), other.model.state_dict().values()))


def test_build_segmenter_refuses_a_bank_of_other_features():
    spec = RunSpec(**TOY, encoder_input_size=224)
    bank = MemoryBank(ColorEncoder(input_size=112).settings())
    with pytest.raises(ValueError, match="input_size"):
        spec.build_segmenter(bank, "cpu")
