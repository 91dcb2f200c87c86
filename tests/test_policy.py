from pathlib import Path

import pytest

from sparsify.errors import PolicyError
from sparsify.passes.plan import AVAILABLE_BACKENDS, init_parameters
from sparsify.passes.rewrite import WEIGHT_INITS
from sparsify.policy import METHODS, EarlyStop, Ramp, Regrowth, Removal, Update, load_policy, schema
from sparsify.topology.initial import INIT_TOPOLOGIES
from sparsify.topology.regrowth import REGROWTH_PREDICTORS
from sparsify.topology.removal import REMOVAL_SCORES
from sparsify.topology.schedules import DENSITY_DECAYS, SOFT_RAMPS, ZETA_SCHEDULES

ROOT = Path(__file__).resolve().parent.parent
POLICIES = sorted((ROOT / "examples" / "policies").glob("*.yaml"))


def write(tmp_path, text):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def error_of(source):
    with pytest.raises(PolicyError) as info:
        load_policy(source)
    return str(info.value)


def test_one_example_policy_per_method():
    # one file per method, plus CHTs with the CH3-L3p predictor (the papers' table has both)
    assert len(POLICIES) == len(METHODS) + 1
    methods = set()
    for path in POLICIES:
        policy = load_policy(path)
        spec = policy.resolve(policy.rules[1])
        methods.add(spec.method)
        assert spec.density == pytest.approx(0.01)
        assert policy.rules[0].skip and policy.rules[0].pattern == "fc4"
    assert methods == set(METHODS)
    l3p = load_policy(ROOT / "examples" / "policies" / "chts_l3p.yaml")
    assert l3p.resolve(l3p.rules[1]).regrowth.predictor == "CH3_L3p"


def test_schema_enums_equal_code_registries():
    defs = schema()["$defs"]
    assert defs["fields"]["properties"]["method"]["enum"] == list(METHODS)
    assert defs["init"]["properties"]["model"]["enum"] == list(INIT_TOPOLOGIES)
    assert defs["removal"]["properties"]["score"]["enum"] == list(REMOVAL_SCORES)
    assert defs["removal"]["properties"]["zeta_schedule"]["enum"] == list(ZETA_SCHEDULES)
    assert defs["regrowth"]["properties"]["predictor"]["enum"] == list(REGROWTH_PREDICTORS)
    assert defs["density_decay"]["properties"]["kind"]["enum"] == list(DENSITY_DECAYS)
    # every init parameter the schema allows is a parameter of some topology, and back
    assert defs["init"]["properties"]["weights"]["enum"] == list(WEIGHT_INITS)
    assert defs["removal"]["properties"]["ramp"]["enum"] == list(SOFT_RAMPS)
    params = set(defs["init"]["properties"]) - {"model", "weights"}
    assert params == set().union(*(init_parameters(m) for m in INIT_TOPOLOGIES))
    assert AVAILABLE_BACKENDS | {"auto"} == set(defs["fields"]["properties"]["backend"]["enum"])


def test_every_preset_field_is_valid_under_the_schema():
    for name in METHODS:
        doc = {"version": 1, "defaults": {"density": 0.1, "method": name}, "unmatched": "sparsify"}
        policy = load_policy(doc)
        spec = policy.resolve(None)
        # restating the whole preset explicitly in a policy must validate too
        explicit = {k: v for k, v in spec.to_dict().items() if v is not None and k not in ("init",)}
        load_policy({"version": 1, "defaults": explicit, "unmatched": "sparsify"})


def test_error_names_file_line_path_and_limit(tmp_path):
    path = write(tmp_path, "version: 1\nrules:\n  - match: {name: a}\n    density: 0.5\n"
                           "  - match: {name: b}\n    density: 1.5\n")
    assert error_of(path) == f"invalid policy:\n  {path}:6: rules[1].density: 1.5 is greater than the maximum 1"


def test_unknown_key_did_you_mean(tmp_path):
    path = write(tmp_path, "version: 1\ndefaults:\n  densty: 0.1\n")
    message = error_of(path)
    assert f"{path}:3: defaults.densty: unknown key 'densty'; did you mean 'density'?" in message


def test_unknown_enum_did_you_mean(tmp_path):
    path = write(tmp_path, "version: 1\ndefaults:\n  density: 0.1\n  method: CHTz\n")
    assert "policy.yaml:4: defaults.method: 'CHTz' is not one of static, SET" in error_of(path)
    assert "did you mean 'CHT" in error_of(path)


def test_all_errors_reported_sorted_by_line(tmp_path):
    path = write(tmp_path, "version: 1\nrules:\n  - match: {regex: 'fc[1-3'}\n    density: 0\n"
                           "  - match: {name: a, type: Linear}\n    sparsity: -1\n")
    lines = error_of(path).splitlines()[1:]
    assert [line.split(":")[1] for line in lines] == ["3", "4", "5", "6"]
    assert "not a valid regular expression" in lines[0]
    assert "rules[0].density: 0 must be greater than 0" in lines[1]
    assert "give exactly one of name, regex, type" in lines[2]
    assert "rules[1].sparsity: -1 is less than the minimum 0" in lines[3]


def test_malformed_yaml_has_a_line(tmp_path):
    path = write(tmp_path, "version: 1\nrules:\n  - match: {name: a\n")
    assert error_of(path).startswith(f"{path}:")
    assert "not valid YAML" in error_of(path)


def test_duplicate_keys_are_errors(tmp_path):
    path = write(tmp_path, "version: 1\ndefaults:\n  density: 0.1\n  density: 0.2\n")
    assert "duplicate key 'density'" in error_of(path)


def test_density_and_sparsity_together():
    assert "give density or sparsity, not both" in error_of(
        {"version": 1, "defaults": {"density": 0.1, "sparsity": 0.9}})


def test_missing_density_is_an_error():
    assert "no density or sparsity given" in error_of({"version": 1, "rules": [{"match": {"name": "a"}}]})


def test_version_and_missing_file(tmp_path):
    assert "version: 2 is not supported" in error_of({"version": 2})
    assert "no such policy file" in error_of(tmp_path / "nope.yaml")
    assert "the policy is empty" in error_of(write(tmp_path, ""))
    assert "must be a mapping" in error_of(write(tmp_path, "- a\n- b\n"))


def test_yaml_is_data_only(tmp_path):
    path = write(tmp_path, "version: 1\ndefaults: !!python/object/apply:os.system ['true']\n")
    assert "not valid YAML" in error_of(path)


def test_preset_fields_are_overridden_field_by_field():
    policy = load_policy({"version": 1, "defaults": {"sparsity": 0.9, "method": "CHTs", "removal": {"zeta": 0.2}},
                          "rules": [{"match": {"name": "a"}, "method": "SET"},
                                    {"match": {"name": "b"}, "removal": {"mode": "hard"}}]})
    a, b = policy.resolve(policy.rules[0]), policy.resolve(policy.rules[1])
    assert a.method == "SET" and a.removal.zeta == 0.2 and a.regrowth.predictor == "random"
    assert b.method == "CHTs" and b.to_dict()["removal"] == {**METHODS["CHTs"]["removal"], "zeta": 0.2, "mode": "hard"}
    assert b.regrowth == Regrowth(predictor="CH2_L3n", mode="soft") and b.percolation is True
    assert b.density == 0.1


def test_chtss_starts_denser():
    policy = load_policy({"version": 1, "defaults": {"density": 0.1, "method": "CHTss"}, "unmatched": "sparsify"})
    spec = policy.resolve(None)
    assert spec.density_decay.kind == "sigmoid" and spec.initial_density == 0.5


@pytest.mark.parametrize("text, expected", [
    ("  init: {model: ER, weigths: swi}\n", "defaults.init.weigths: unknown key 'weigths'; did you mean 'weights'?"),
    ("  init: {model: ER, weights: SWI}\n", "defaults.init.weights: 'SWI' is not one of swi, kaiming, rescale, keep; "
                                            "did you mean 'swi'?"),
    ("  removal: {ramp: temprature}\n", "defaults.removal.ramp: 'temprature' is not one of delta, temperature; "
                                        "did you mean 'temperature'?"),
    ("  density_decay: {kind: emss}\n", "did you mean 'ems'?"),
])
def test_recipe_options_name_the_field_and_the_nearest_choice(tmp_path, text, expected):
    path = write(tmp_path, "version: 1\ndefaults:\n  density: 0.1\n" + text)
    assert f"{path}:4: " in error_of(path) and expected in error_of(path)


def test_the_distributed_mode_is_ddp_or_fsdp(tmp_path):
    assert load_policy({"version": 1, "defaults": {"density": 0.1}}).training_config().distributed == "ddp"
    sharded = {"version": 1, "defaults": {"density": 0.1}, "training": {"distributed": "fsdp"}}
    assert load_policy(sharded).training_config().distributed == "fsdp"
    path = write(tmp_path, "version: 1\ndefaults:\n  density: 0.1\ntraining:\n  distributed: fsdb\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert "training.distributed: 'fsdb' is not one of ddp, fsdp; did you mean 'fsdp'?" in str(info.value)


def test_training_recipe_options_are_checked(tmp_path):
    path = write(tmp_path, "version: 1\ndefaults:\n  density: 0.1\ntraining:\n  lr_step: epochs\n  lr_end_factr: 0.1\n")
    message = error_of(path)
    assert "training.lr_step: 'epochs' is not one of step, epoch; did you mean 'epoch'?" in message
    assert "training.lr_end_factr: unknown key 'lr_end_factr'; did you mean 'lr_end_factor'?" in message


def test_a_rule_turns_off_a_presets_early_stop_with_null():
    def spec(rule):
        rules = [{"match": {"name": "fc1"}, "density": 0.01, "method": "CHT", **rule}]
        policy = load_policy({"version": 1, "rules": rules})
        return policy.resolve(policy.match("fc1", ("Linear",)))
    assert spec({}).early_stop == EarlyStop(0.9)
    assert spec({"early_stop": None}).early_stop is None
    assert spec({"early_stop": {"overlap": 0.5}}).early_stop == EarlyStop(0.5)


def test_presets_carry_the_official_recipe():
    def spec(method):
        return load_policy({"version": 1, "defaults": {"density": 0.01, "method": method}}).resolve(None)
    chts, cht, chtss = spec("CHTs"), spec("CHT"), spec("CHTss")
    assert chts.removal == Removal(score="RI", alpha=0.0, mode="soft", ramp="temperature", delta=Ramp(0.5, 0.75),
                                   zeta=0.3, zeta_schedule="cosine", gamma=0.01)
    assert chts.regrowth == Regrowth("CH2_L3n", "soft") and chts.percolation and chts.t_end == 0.75
    assert cht.t_end == 1.0 and cht.regrowth.predictor == "CH3_L3p" and cht.early_stop == EarlyStop(0.9)
    assert (chtss.removal.score, chtss.removal.zeta, chtss.removal.delta.end) == ("WM", 0.1, 0.9)
    assert chtss.update == Update(every=100, unit="steps") and not chtss.percolation
    assert chtss.density_decay.kind == "sigmoid" and chtss.initial_density == 0.5


def test_export_static_shapes_is_a_policy_field_with_did_you_mean(tmp_path):
    from sparsify.export.options import ExportOptions

    path = write(tmp_path, "version: 1\ndefaults:\n  density: 0.1\nexport:\n  static_shape: true\n")
    assert "export.static_shape: unknown key 'static_shape'; did you mean 'static_shapes'?" in error_of(path)
    policy = load_policy({"version": 1, "defaults": {"density": 0.1}, "export": {"static_shapes": True}})
    assert ExportOptions.from_section(policy.export).export_kwargs()["static_shapes"] is True
    assert ExportOptions.from_section(policy.export, static_shapes=None).static_shapes is True  # no flag: the policy's
