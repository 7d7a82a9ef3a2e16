"""Every experiment of docs/RESULTS.md is a config (conf/experiment/<name>.yaml): each composes through the real
Hydra composition into a config the pre-flight check accepts, names the command that runs it, and, where its
figure came from committed run directories, composes into exactly the configuration those runs recorded and quotes
the figures `python -m seqrec.results` computes from them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from seqrec.results import mean_ci_cell, results_table
from seqrec.run_dirs import IGNORED_OVERRIDES, read_overrides
from seqrec.train import resume_policy
from seqrec.train.resume_policy import upgrade_layout
from seqrec.utils.config import check_config
from tests.conftest import CONF, REPO, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
RESULTS = REPO / "docs" / "results"

# Keys a recorded run does not pin down: where the data and the outputs were, the progress bar, the sweep name,
# and machine-level groups (SLURM, the DDP rendezvous).
NOT_SETTINGS = {"dataset.path", "trainer.output_dir", "logger.output_dir", "trainer.progress", "sweep_name"}
NOT_SETTINGS |= {"model.num_items"}  # filled in from the data at run time
# how the same maths is computed, not what is computed (the compile path recorded by older runs is gone)
NOT_SETTINGS |= {"kernels", "residual.kernel", "residual.compile", "dataset.cache", "eval.item_chunk"}
NOT_SETTING_GROUPS = ("slurm.", "distributed.", "hydra.")
# Keys added to the product after a run, with the default that does what the code did before they existed: the
# resume policy's table, plus keys that table leaves out because they may change on resume.
ADDED_SINCE = {
    **resume_policy.ADDED_SINCE,
    "sampler.history": "last",
    "trainer.plateau_decays": 0,
    "trainer.plateau_factor": 0.1,
    "loss.chunk_tokens": None,
    "dataset.duplicates": "drop",  # the MovieLens files hold no exact duplicate rows: dropping none is what was done
}
# Older spellings of the same setting: recorded key and value -> today's key and value.
RENAMED: dict = {}


def header(name: str) -> str:
    lines = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
    return "\n".join(line for line in lines if line.startswith("#"))


def header_text(name: str) -> str:
    """The header as one line of prose: the `#`s gone and the line wraps joined, so a figure split over two lines
    ("0.1825 ±" / "# 0.0050") reads whole."""
    return " ".join(" ".join(line.lstrip("#").split()) for line in header(name).splitlines())


# A quoted figure: "[sampled ]NDCG@10 0.1948 ± 0.0015" (mean ± half-width of the 95 % CI) or "HR@10 0.2425" (a
# mean); a test metric, full ranking unless "sampled" precedes it.
FIGURE = re.compile(r"(?P<sampled>sampled )?(?P<metric>NDCG|HR|MRR)@(?P<k>\d+) (?P<quoted>\d\.\d{4}(?: ± \d\.\d{4})?)")
FOUR_DECIMALS = re.compile(r"\d\.\d{4}")


def quoted_figures(name: str) -> list[tuple[str, str]]:
    """(results.json key, the figure as quoted) for each figure the header quotes."""
    return [
        (f"test{'_sampled' if m['sampled'] else ''}/{m['metric'].lower()}@{m['k']}", m["quoted"])
        for m in FIGURE.finditer(header_text(name))
    ]


def run_directories(name: str) -> list[Path]:
    """The seed folders of the run directories the experiment's header cites (docs/results/.../<name>/)."""
    cited = [word.rstrip(".,") for word in header(name).split() if word.startswith("docs/results/")]
    return sorted(seed for folder in cited for seed in (REPO / folder).glob("**/seed*") if seed.is_dir())


def recorded_config(run: Path) -> tuple[dict, bool] | None:
    """(the config a run directory recorded, whether its values are resolved), or None for a log-only folder.

    run.json, then results.json's "config" (both resolved), then .hydra/config.yaml (older runs, unresolved)."""
    for record in (run / "run.json", run / "results.json"):
        config = json.loads(record.read_text()).get("config") if record.is_file() else None
        if config:
            return config, True
    hydra = run / ".hydra" / "config.yaml"
    return (yaml.safe_load(hydra.read_text()), False) if hydra.is_file() else None


def in_todays_layout(record: dict) -> dict:
    """A record from before `optimizer=`/`schedule=` (trainer.lr & co.), read as the resume policy reads it."""
    sampler = record.get("sampler") or {}
    if sampler.get("batch_size") == "${trainer.batch_size}":  # unresolved .hydra/config.yaml: the value it meant
        record = {**record, "sampler": {**sampler, "batch_size": record["trainer"]["batch_size"]}}
    return upgrade_layout(record)


def flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def is_setting(key: str) -> bool:
    return key not in NOT_SETTINGS and not key.startswith(NOT_SETTING_GROUPS)


def test_there_is_an_experiment_for_every_published_run_directory():
    published = {p.parent.relative_to(RESULTS) for p in RESULTS.glob("*/*/seed*")}
    cited = {seed.parent.relative_to(RESULTS) for name in EXPERIMENTS for seed in run_directories(name)}
    cited |= {Path("ml1m_cpu_h128_decay/ml1m_sasrec_ce_h128_decay")}  # logs only: continued runs, no config
    assert published <= cited


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_experiment_composes_and_passes_the_preflight_check(name, tmp_path):
    cfg = compose_config([f"experiment={name}", "seed=1"], tmp_path)
    check_config(cfg)
    assert cfg.seed == 1
    assert f"python train.py experiment={name} seed=1" in header(name)
    assert "docs/RESULTS.md" in header(name)
    assert (CONF / "experiment" / f"{name}.yaml").read_text().startswith("# @package _global_\n")


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if FOUR_DECIMALS.search(header(n))])
def test_the_header_quotes_what_the_results_tool_computes_from_its_runs(name):
    """The header's figures are `python -m seqrec.results <its run directories>` as that prints them: mean ± the
    half-width of the 95 % CI over the seeds, 4 decimals (a figure without ± is checked as the mean)."""
    figures = quoted_figures(name)
    text = header_text(name)
    unread = len(FOUR_DECIMALS.findall(text)) - sum(len(FOUR_DECIMALS.findall(quoted)) for _, quoted in figures)
    assert not unread, f"{name}: {unread} 4-decimal number(s) not quoted as 'METRIC@k mean [± half]': {text}"
    assert "mean ± 95 % CI" in text, f"{name}: the header does not say what its ± is"
    folders = sorted({str(seed.parent) for seed in run_directories(name)})
    assert folders, f"{name}: quotes figures but cites no run directories"
    _, summary, _ = results_table(folders, sorted({key for key, _ in figures}), fmt="csv")
    assert len(summary) == 1, f"{name}: the cited run directories hold {len(summary)} rows, not one"
    row = summary.iloc[0]
    computed = {key: mean_ci_cell(row[key], row[f"{key} ci95"]) for key, _ in figures}
    wrong = [
        f"{key} quoted {quoted}, computed {computed[key]}"
        for key, quoted in figures
        if quoted != (computed[key] if " ± " in quoted else f"{row[key]:.4f}")
    ]
    assert not wrong, f"{name}: " + "; ".join(wrong)


def command_line_keys(name: str) -> set[str]:
    """The keys the header's `python train.py experiment=<name> seed=1 ...` line sets, its trailing comment
    included (where ml1m_sasrec_ce_h128 gives the time limits its seeds 2 and 3 ran under)."""
    line = next(line for line in header(name).splitlines() if f"python train.py experiment={name} " in line)
    return {override_key(word) for word in line.split() if re.match(r"[+~]*[\w.]+=", word)}


def override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def replayed_overrides(name: str, run: Path, recorded: dict) -> list[str]:
    """The overrides composing a run replays. A key the experiment's header shows on its command line is one of the
    experiment's free parameters (the depth study's model.num_blocks, its lr probe's optimizer.lr): its value comes
    from the run's record, whether the run set it on its command line or inherited it from the experiment as it was
    then. Of the run's other recorded overrides, only those that do not change what is computed are replayed
    (seqrec.run_dirs.IGNORED_OVERRIDES: the progress bar, the checkpoint cadence, where outputs go), so that what
    any other changed shows up as drift; experiment and seed are composed from the record itself."""
    shown = command_line_keys(name) - {"experiment", "seed"}
    harmless = [o for o in read_overrides(run) if override_key(o) in IGNORED_OVERRIDES - shown]
    free = [f"{key}={as_override(recorded[key])}" for key in sorted(shown) if key in recorded]
    return harmless + free


def as_override(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def drift(name: str, run: Path, tmp_path: Path) -> list[str]:
    """Each setting where `experiment=<name>` (with the run's seed, device and replayed overrides) composes into
    something other than what the run recorded: "key: recorded X, composed Y"."""
    record, resolved = recorded_config(run)
    recorded = flat(in_todays_layout(record))
    overrides = [f"experiment={name}", f"seed={recorded['seed']}", f"trainer.device={recorded['trainer.device']}"]
    now = flat(
        OmegaConf.to_container(
            compose_config(overrides + replayed_overrides(name, run, recorded), tmp_path), resolve=resolved
        )
    )
    if "${" in str(recorded.get("trainer.amp_dtype")) + str(now.get("trainer.amp_dtype")):
        recorded.pop("trainer.amp_dtype", None)  # "the machine's best dtype": not a setting of the experiment
        now.pop("trainer.amp_dtype", None)
    for (old_key, old_value), (new_key, new_value) in RENAMED.items():
        if recorded.get(old_key) == old_value:
            recorded.pop(old_key)
            recorded[new_key] = new_value
    return [
        f"{key}: recorded {recorded.get(key, ADDED_SINCE.get(key))!r}, composed {now.get(key)!r}"
        for key in sorted(set(recorded) | set(now))
        if is_setting(key) and recorded.get(key, ADDED_SINCE.get(key)) != now.get(key, ADDED_SINCE.get(key))
    ]


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if any(map(recorded_config, run_directories(n)))])
def test_the_experiment_is_what_its_published_runs_recorded(name, tmp_path):
    for run in filter(recorded_config, run_directories(name)):
        assert not (found := drift(name, run, tmp_path)), f"{run.relative_to(REPO)}: " + "; ".join(found)


def fake_run(tmp_path: Path, name: str, overrides: list[str]) -> Path:
    """A run directory as training `python train.py experiment=<name> <overrides>` records it (results.json's
    config, .hydra/overrides.yaml), without training."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    config = OmegaConf.to_container(compose_config([f"experiment={name}", *overrides], tmp_path), resolve=True)
    (run / "results.json").write_text(json.dumps({"config": config}))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"experiment={name}", *overrides]))
    return run


def test_a_recorded_override_the_header_shows_or_that_computes_nothing_is_replayed(tmp_path):
    name = "depth_ml1m_sasrec_plain"  # its header shows model.num_blocks=8
    run = fake_run(tmp_path, name, ["seed=2", "model.num_blocks=4", "trainer.checkpoint_every_min=5"])
    assert drift(name, run, tmp_path) == []


def test_a_free_parameter_the_run_inherited_from_an_earlier_version_of_the_experiment_is_read_from_its_record(
    tmp_path,
):
    """The lr probe's first runs were made while the experiment itself said lr 1e-3: their command line has no
    optimizer.lr, their record has it, and the header shows optimizer.lr as a free parameter."""
    name = "depth_ml1m_sasrec_plain"
    run = fake_run(tmp_path, name, ["seed=1", "model.num_blocks=2", "optimizer.lr=0.001"])
    (run / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"experiment={name}", "seed=1", "model.num_blocks=2"])
    )
    assert drift(name, run, tmp_path) == []


@pytest.mark.parametrize(
    "name, override",
    [("depth_ml1m_sasrec_plain", "model.dropout_rate=0.5"), ("ml1m_sasrec_ce_h256", "model.num_blocks=4")],
)
def test_any_other_recorded_override_is_drift(name, override, tmp_path):
    run = fake_run(tmp_path, name, ["seed=1", override])
    assert [line.partition(":")[0] for line in drift(name, run, tmp_path)] == [override_key(override)]
