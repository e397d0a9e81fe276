"""The losses and metrics on batches worked out by hand; each loss's parameters and trainer
name checked in one line; a sweep over losses; and README's "Add a loss" example, run as shown."""
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, launch, launch_each
from train.trainers import loss_params
from train.errors import UserError
from train.losses import bradley_terry_loss, hinge_loss, pair_metrics, smoothed_bradley_terry_loss
from train.trainers import BradleyTerrySmoothTrainer, BradleyTerryTrainer, HingeTrainer, trainer_class


def nls(x):  # -log sigmoid(x), by hand
    return math.log(1 + math.exp(-x))


def test_loss_matches_hand_computation():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = (nls(1.0) + nls(-1.0)) / 2  # = (0.31326 + 1.31326) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.813262, abs=1e-6)


def test_margin_is_subtracted_from_the_difference():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    margin = torch.tensor([0.5, 0.0])
    expected = (nls(0.5) + nls(-1.0)) / 2
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(expected, abs=1e-6)


def test_centering_term_adds_coefficient_times_mean_square_sum():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    base = (nls(1.0) + nls(-1.0)) / 2
    # (s_c + s_r)^2 = [9, 1] -> mean 5 -> 0.1 * 5 = 0.5
    got = bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.1).item()
    assert got == pytest.approx(base + 0.5, abs=1e-6)


def test_loss_is_fp32_for_bf16_scores():
    chosen = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    rejected = torch.tensor([0.0, 0.0], dtype=torch.bfloat16)
    assert bradley_terry_loss(chosen, rejected).dtype == torch.float32


def test_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)


def test_pair_metrics_count_a_tie_as_wrong():
    m = pair_metrics(torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.0, 1.0, 1.5]))
    assert m["n"] == 3 and m["correct"] == 1  # the tie (1.0 vs 1.0) is not correct
    assert m["margin"] == pytest.approx(1.0 + 0.0 - 1.0)
    assert m["chosen"] == pytest.approx(3.5) and m["rejected"] == pytest.approx(3.5)


def test_label_smoothing_mixes_in_the_flipped_label():
    chosen, rejected, margin = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.0])
    # d = [0.5, -1]; per pair 0.9 * -log sigmoid(d) + 0.1 * -log sigmoid(-d)
    expected = (0.9 * nls(0.5) + 0.1 * nls(-0.5) + 0.9 * nls(-1.0) + 0.1 * nls(1.0)) / 2
    assert expected == pytest.approx(0.868670, abs=1e-6)  # (0.524077 + 1.213262) / 2
    got = smoothed_bradley_terry_loss(chosen, rejected, margin, label_smoothing=0.1)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected, abs=1e-6)
    # eps = 0 is plain Bradley-Terry, and the centering term adds as there
    assert smoothed_bradley_terry_loss(chosen, rejected, margin, 0.0).item() == \
        pytest.approx(bradley_terry_loss(chosen, rejected, margin).item(), abs=1e-7)
    assert smoothed_bradley_terry_loss(chosen, rejected, margin, 0.1, center_rewards_coefficient=0.1).item() == \
        pytest.approx(expected + 0.5, abs=1e-6)


def test_hinge_is_zero_once_chosen_leads_by_the_hinge_margin():
    chosen, rejected = torch.tensor([2.0, 0.0, 3.0], requires_grad=True), torch.tensor([1.0, 1.0, 0.0])
    margin = torch.tensor([0.5, 0.0, 0.0])
    # d = [0.5, -1, 3] -> max(0, 1 - d) = [0.5, 2, 0] -> mean 2.5 / 3
    loss = hinge_loss(chosen, rejected, margin, hinge_margin=1.0)
    assert loss.item() == pytest.approx(2.5 / 3, abs=1e-6)
    loss.backward()
    assert chosen.grad.tolist() == pytest.approx([-1 / 3, -1 / 3, 0.0])  # the third pair is done


C, R, M = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.0])


@pytest.mark.parametrize("cls,options,expected", [
    (BradleyTerryTrainer, {"center_rewards_coefficient": 0.01}, bradley_terry_loss(C, R, M, 0.01)),
    (BradleyTerrySmoothTrainer, {"label_smoothing": 0.2, "center_rewards_coefficient": 0.01},
     smoothed_bradley_terry_loss(C, R, M, 0.2, 0.01)),
    (HingeTrainer, {"hinge_margin": 2.0}, hinge_loss(C, R, M, 2.0)),
])
def test_each_trainer_passes_its_params_and_the_margin_to_its_loss(cls, options, expected):
    trainer = cls.__new__(cls)  # loss() needs only the params
    trainer.params = loss_params(cls, {"trainer": cls.__name__, **options})
    assert trainer.loss(C, R, M).item() == pytest.approx(expected.item(), abs=1e-7)


# ---- parameters and names, each one line ---------------------------------------------------------
@pytest.mark.parametrize("trainer,options,message", [
    (BradleyTerryTrainer, {"center_rewards_coefficient": -1}, "loss.center_rewards_coefficient must be at least 0"),
    (BradleyTerryTrainer, {"center_rewards_coefficient": "high"},
     "config key 'loss.center_rewards_coefficient' must be a number, got 'high'"),
    (BradleyTerryTrainer, {"center_rewards_coeff": 0.1},
     r"unknown config key 'loss.center_rewards_coeff' \(did you mean 'center_rewards_coefficient'\?\)"),
    (BradleyTerrySmoothTrainer, {"label_smoothing": 0.5}, r"loss.label_smoothing must be at least 0 and less than 0.5"),
    (BradleyTerrySmoothTrainer, {"label_smoothing": -0.1}, r"loss.label_smoothing must be at least 0"),
    (HingeTrainer, {"hinge_margin": -1.0}, r"loss.hinge_margin must be at least 0"),
    (HingeTrainer, {"center_rewards_coefficient": 0.0}, r"unknown config key .*HingeTrainer takes hinge_margin"),
])
def test_bad_loss_parameters_are_one_line(trainer, options, message):
    with pytest.raises(UserError, match=message) as err:
        loss_params(trainer, {"trainer": trainer.__name__, **options})
    assert "\n" not in str(err.value)


def test_loss_params_are_typed_with_defaults():
    params = loss_params(BradleyTerrySmoothTrainer, {"trainer": "x", "label_smoothing": 0})
    assert params == BradleyTerrySmoothTrainer.Params(label_smoothing=0.0, center_rewards_coefficient=0.0)
    assert isinstance(params.label_smoothing, float)
    assert loss_params(HingeTrainer, {"trainer": "x"}).hinge_margin == 1.0


@pytest.mark.parametrize("name,message", [
    ("PairedPreferenceTrainer", r"^loss.trainer 'PairedPreferenceTrainer' is abstract: it defines no loss\(\)$"),
    ("BasicTrainer", r"is abstract: it defines no forward\(\), loss\(\)$"),
    ("BradleyTerryTrainr", r"no class train.trainers.BradleyTerryTrainr \(did you mean 'BradleyTerryTrainer'\?\)"),
    ("no_such_pkg.losses.X", r"cannot load it with hydra.utils.get_class \(No module named 'no_such_pkg'\)"),
    ("train.tracking.Tracker", r"not a subclass of train.trainers.BasicTrainer"),
])
def test_a_bad_trainer_name_is_one_line(name, message):
    with pytest.raises(UserError, match=message) as err:
        trainer_class(name)
    assert "\n" not in str(err.value)


def test_trainers_are_found_by_short_name_or_dotted_path():
    assert trainer_class("BradleyTerryTrainer") is BradleyTerryTrainer
    assert trainer_class("train.trainers.HingeTrainer") is HingeTrainer


def test_every_loss_yaml_names_a_trainer_and_sets_exactly_its_parameters():
    for path in sorted((ROOT / "config" / "loss").glob("*.yaml")):
        options = yaml.safe_load(path.read_text())
        trainer = trainer_class(options.pop("trainer"))
        assert set(options) == set(trainer.Params.__dataclass_fields__), path.name
        assert loss_params(trainer, options) == trainer.Params(), path.name  # the YAML holds the defaults


# ---- end to end: a sweep over losses, and README's example ----------------------------------------
SMALL = ["model=tiny-llama", "datasets.synthetic.n_train=64", "datasets.synthetic.n_test=16", "n_eval_examples=16",
         "batch_size=16", "microbatch_size=8", "eval_every=64", "write_predictions=true"]


def eval_loss_from_predictions(run_dir: Path, loss_fn) -> float:
    """The loss recomputed from the final eval's scores (synthetic pairs have no margin)."""
    rows = [json.loads(line) for line in (run_dir / "generated_predictions.jsonl").read_text().splitlines()]
    chosen, rejected = torch.tensor([r["chosen"] for r in rows]), torch.tensor([r["rejected"] for r in rows])
    return loss_fn(chosen, rejected, torch.zeros(len(rows))).item()


def test_a_sweep_over_losses_runs_each_loss_in_its_own_job(cache):
    launch(["-m", "loss=bradley-terry,bradley-terry-smooth", *SMALL, f"cache_dir={cache}", "exp_name=losses"])
    expected = {"bradley-terry": ("BradleyTerryTrainer", bradley_terry_loss),
                "bradley-terry-smooth": ("BradleyTerrySmoothTrainer",
                                         lambda c, r, m: smoothed_bradley_terry_loss(c, r, m, 0.1))}
    jobs = {o[len("loss="):]: path.parent.parent for path in (Path(cache) / "losses").glob("*/.hydra/overrides.yaml")
            for o in yaml.safe_load(path.read_text()) if o.startswith("loss=")}
    assert sorted(jobs) == sorted(expected)
    for name, (trainer, loss_fn) in expected.items():
        job = jobs[name]
        assert yaml.safe_load((job / "config.yaml").read_text())["loss"]["trainer"] == trainer
        final = json.loads((job / "FINAL" / "metrics.json").read_text())
        assert final["loss"] == pytest.approx(eval_loss_from_predictions(job, loss_fn), abs=1e-5), name


def readme_example() -> tuple:
    """README's "Add a loss": the files it shows ({path: text}, each block's first line names its
    path) and the command it runs."""
    section = (ROOT / "README.md").read_text().split("## Add a loss", 1)[1].split("\n## ", 1)[0]
    files, command = {}, None
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, re.S):
        first = body.splitlines()[0]
        if lang in ("python", "yaml") and first.startswith("# ") and "/" in first:
            files[first[2:].strip()] = body
        elif lang == "bash" and command is None:
            command = body.strip()
    return files, command


def test_readme_add_a_loss_example_trains_as_shown(tmp_path, cache):
    files, command = readme_example()
    assert sorted(files) == ["config/loss/ipo.yaml", "my_losses/ipo.py"] and command.startswith("python launch.py ")
    # a copy of the repo's entry point, package and configs, plus the README's files where it puts them
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "train", repo / "train", ignore=ignore)
    shutil.copytree(ROOT / "config", repo / "config", ignore=ignore)
    shutil.copy(ROOT / "launch.py", repo / "launch.py")
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    args = command.split()[2:]
    launch([*args, *SMALL, f"cache_dir={cache}"], cwd=repo)

    run = Path(cache) / next(a.split("=", 1)[1] for a in args if a.startswith("exp_name="))
    loss = yaml.safe_load((run / "config.yaml").read_text())["loss"]
    assert loss == {"trainer": "my_losses.ipo.IPOTrainer", "tau": 0.05}
    final = json.loads((run / "FINAL" / "metrics.json").read_text())
    ipo = eval_loss_from_predictions(run, lambda c, r, m: ((c - r - m - 1 / (2 * 0.05)) ** 2).mean())
    assert final["loss"] == pytest.approx(ipo, rel=1e-5)

    # its parameter is checked like any other: a bad value or a typo is one line before any model loads
    bad = [("loss.tau=0", "loss.tau must be more than 0, got 0"),
           ("loss.taw=0.1", "unknown config key 'loss.taw' (did you mean 'tau'?)")]
    procs = launch_each([[*args, b, f"cache_dir={cache}", "exp_name=bad"] for b, _ in bad], cwd=repo)
    for (_, message), proc in zip(bad, procs):
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


LOSS_MISTAKES = [
    (["loss.center_rewards_coefficient=-1"], "error: loss.center_rewards_coefficient must be at least 0"),
    (["loss=hinge", "loss.hinge_margn=2"], "error: unknown config key 'loss.hinge_margn' (did you mean 'hinge_margin'?)"),
    (["loss.trainer=PairedPreferenceTrainer"], "error: loss.trainer 'PairedPreferenceTrainer' is abstract"),
]


def test_loss_mistakes_on_the_command_line_are_one_line(cache):
    procs = launch_each([["model=tiny-llama", *args, f"cache_dir={cache}"] for args, _ in LOSS_MISTAKES])
    for (args, expected), proc in zip(LOSS_MISTAKES, procs):
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), (args, proc.stderr)
