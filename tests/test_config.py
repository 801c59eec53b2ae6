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
