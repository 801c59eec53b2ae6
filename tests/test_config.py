"""The paper presets hold the paper's settings [P App. G, Tables 4-5; scm-reference.md §2, §6]."""
import math

import pytest

from scm_fast import config

# preset -> the paper's values (iterations x batch / 1000 = kimg; t_ref likewise)
PAPER = {
    "cifar10-teacher": dict(optimizer="adam", lr=1e-3, betas=(0.9, 0.999), batch=512, dropout=0.13,
                            total_kimg=400_000 * 512 / 1000, class_cond=False),
    "cifar10-sct": dict(optimizer="radam", lr=1e-4, betas=(0.9, 0.99), eps=1e-8, batch=512, dropout=0.2,
                        ema="halflife", ema_halflife_kimg=500.0, P_mean=-1.0, P_std=1.4, tangent_warmup=10_000,
                        lr_schedule="constant"),
    "cifar10-scd": dict(optimizer="radam", lr=1e-4, dropout=0.0, ema_halflife_kimg=500.0),
    "imagenet64-teacher": dict(lr=1e-2, batch=2048, eps=1e-11, P_mean=-0.8, P_std=1.6, dropout=0.0,
                               lr_ref_kimg=35_000 * 2048 / 1000, total_kimg=1_048_000 * 2048 / 1000),
    "imagenet64-sct": dict(lr=1e-4, P_mean=-1.0, P_std=1.6, dropout=0.45, dropout_res=16, precision="fp16",
                           ema="power", ema_sigma_rels=(0.05,), total_kimg=400_000 * 2048 / 1000),
    "imagenet64-scd": dict(lr=1e-4, dropout=0.0, total_kimg=400_000 * 2048 / 1000),
    "imagenet512-teacher": dict(lr=6.5e-3, P_mean=-0.4, P_std=1.0, dropout=0.1, label_dropout=0.1,
                                lr_ref_kimg=70_000 * 2048 / 1000, total_kimg=376_000 * 2048 / 1000),
    "imagenet512-sct": dict(lr=6.5e-5, P_mean=-0.8, P_std=1.6, dropout=0.35, dropout_res=16,
                            lr_ref_kimg=70_000 * 2048 / 1000, total_kimg=100_000 * 2048 / 1000),
    "imagenet512-scd": dict(lr=6.5e-5, dropout=0.1, dropout_res=16, guidance_min=1.0, guidance_max=2.0,
                            lr_ref_kimg=70_000 * 2048 / 1000, total_kimg=200_000 * 2048 / 1000),
}


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_paper_presets_hold_the_papers_settings(preset):
    cfg = config.resolve(preset, for_run=False)
    for name, value in PAPER[preset].items():
        got = getattr(cfg, name)
        assert got == (pytest.approx(value) if isinstance(value, float) else value), (preset, name, got, value)


def test_consistency_models_fine_tune_from_the_teacher_at_a_fraction_of_its_lr():
    """[P App. G]: every CM starts from the teacher's EMA; CIFAR-10 at 0.1x its lr, ImageNet at 0.01x;
    digits sCD at 0.1x, sCT from the teacher at 0.05x (config.py's comment has the runs)."""
    ratios = {"cifar10": (0.1, 0.1), "imagenet64": (0.01, 0.01), "imagenet512": (0.01, 0.01), "digits": (0.05, 0.1)}
    for family, (sct_ratio, scd_ratio) in ratios.items():
        teacher = config.resolve(f"{family}-teacher", for_run=False)
        for kind, ratio in zip(("sct", "scd") if family != "digits" else ("sct-ft", "scd"), (sct_ratio, scd_ratio)):
            cm = config.resolve(f"{family}-{kind}", for_run=False)
            assert cm.lr == pytest.approx(teacher.lr * ratio), (family, kind)
            assert (cm.init or cm.teacher) == f"runs/{family}-teacher", (family, kind)
            assert cm.batch == teacher.batch and cm.sigma_d == teacher.sigma_d, (family, kind)


def test_digits_sigma_d_is_the_datas_std():
    from scm_fast import data
    x = data.digits().get_batch(list(range(1797)))[0]
    for preset in ("digits-teacher", "digits-sct", "digits-sct-ft", "digits-scd"):
        assert config.resolve(preset, for_run=False).sigma_d == pytest.approx(x.std().item(), abs=0.01)


def test_t_mid_and_dropout_res_are_validated():
    with pytest.raises(ValueError, match="--t-mid"):
        config.resolve(t_mid=math.pi / 2 + 0.1)
    with pytest.raises(ValueError, match="--dropout-res"):
        config.resolve(dropout_res=-1)


# ---- the fields' help and domains, the help file, the objective's config -------------------------
from dataclasses import fields  # noqa: E402
from pathlib import Path  # noqa: E402

HELP_FILE = Path(__file__).resolve().parents[1] / "docs" / "train-help.txt"
REGENERATE = ("python -c \"from scm_fast import config; print(config.help_text(), end='')\" > docs/train-help.txt")
FREE_FORM = {"run_dir", "allow_change", "data", "model", "teacher", "init", "vae"}  # str flags without a fixed set of values


def test_help_file_is_current():
    current = config.help_text()
    assert HELP_FILE.exists(), f"docs/train-help.txt is missing; regenerate it with:\n  {REGENERATE}"
    assert HELP_FILE.read_text() == current, (
        f"docs/train-help.txt differs from `python -m scm_fast.train --help`; regenerate it with:\n  {REGENERATE}")


def test_help_is_what_the_trainer_prints_and_does_not_depend_on_the_terminal(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    with pytest.raises(SystemExit) as exit_info:
        config.parse(["--help"])  # what `python -m scm_fast.train --help` runs
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == config.help_text() == HELP_FILE.read_text()


def test_every_flag_has_a_help_sentence_and_every_choice_field_its_choices():
    actions = {a.dest: a for a in config.build_parser()._actions}
    defaults = config.TrainConfig()
    for f in fields(config.TrainConfig):
        sentence = f.metadata.get("help", "")
        assert len(sentence.split()) >= 4 and "(default" not in sentence, (f.name, sentence)
        action = actions[f.name]
        assert action.help.replace("%%", "%").startswith(sentence), (f.name, action.help)
        if f.name == "preset":
            assert sorted(action.choices) == sorted(config.PRESETS)
        elif f.metadata["choices"]:
            assert tuple(action.choices) == f.metadata["choices"] and getattr(defaults, f.name) in action.choices
        elif isinstance(getattr(defaults, f.name), str):
            assert f.name in FREE_FORM, f"--{f.name} is a str flag without choices"
    for dest in ("dry_run", "world_size"):
        assert len(actions[dest].help.split()) >= 4


def test_bounds_come_from_the_fields_and_show_in_the_help():
    actions = {a.dest: a for a in config.build_parser()._actions}
    bounded = {f.name: f.metadata for f in fields(config.TrainConfig) if config._domain(f.metadata)}
    assert {"batch", "total_kimg", "lr", "dropout_res", "t_mid", "dropout", "label_dropout"} <= set(bounded)
    for name, meta in bounded.items():
        assert config._domain(meta) in actions[name].help, name
        low = meta["gt"] if meta["gt"] is not None else meta["ge"]
        bad = low if meta["gt"] is not None else low - 1
        with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must be"):
            config.resolve(**{name: bad})
        if meta["lt"] is not None:
            with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must be in"):
                config.resolve(**{name: meta["lt"]})
    for f in fields(config.TrainConfig):
        if f.metadata["choices"]:
            with pytest.raises(ValueError, match=f"--{f.name.replace('_', '-')} must be one of"):
                config.resolve(**{f.name: "bogus"})


def test_model_help_names_the_network_presets():
    from scm_fast.models import PRESETS as DIT_PRESETS, UNET_PRESETS
    sentence = next(f for f in fields(config.TrainConfig) if f.name == "model").metadata["help"]
    dit, unet = sentence.split("for dit ")[1].split("; for diffusers ")[0].split("; for unet ")
    assert dit.split(", ") == list(DIT_PRESETS) and unet.split(", ") == list(UNET_PRESETS)


def _scm_config_as_train_py_built_it(cfg):
    """The SCMConfig the trainer built field by field before config.scm_config (scm_fast/train.py)."""
    from scm_fast import objectives
    return objectives.SCMConfig(
        sigma_d=cfg.sigma_d, P_mean=cfg.P_mean, P_std=cfg.P_std, tangent_warmup=cfg.tangent_warmup,
        tangent_norm=cfg.tangent_norm, tangent_norm_c=cfg.tangent_norm_c, rearranged_jvp=cfg.rearranged_jvp,
        prior_weighting=cfg.prior_weighting, one_pass=cfg.one_pass and not cfg.act_ckpt,
        guidance_input=cfg.objective == "scd", guidance_min=cfg.guidance_min, guidance_max=cfg.guidance_max)


@pytest.mark.parametrize("preset", sorted(config.PRESETS))
@pytest.mark.parametrize("overrides", [{}, dict(act_ckpt=True), dict(one_pass=False), dict(tangent_norm="rms")])
def test_scm_config_is_what_the_trainer_built(preset, overrides):
    cfg = config.resolve(preset, for_run=False, **overrides)
    assert config.scm_config(cfg) == _scm_config_as_train_py_built_it(cfg)


def test_scm_config_names_a_knob_it_cannot_fill(monkeypatch):
    import dataclasses

    from scm_fast import objectives
    extended = dataclasses.make_dataclass("SCMConfig", [("new_knob", float, dataclasses.field(default=0.0))],
                                          bases=(objectives.SCMConfig,))
    monkeypatch.setattr(objectives, "SCMConfig", extended)
    with pytest.raises(TypeError, match="SCMConfig.new_knob"):
        config.scm_config(config.resolve(for_run=False))
