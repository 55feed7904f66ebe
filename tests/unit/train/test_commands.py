"""keeper_train.commands: flags are "not given" unless typed, so a --config file is never overridden
silently; every flag says what it does; the parsers and the jobs do not import each other."""

from __future__ import annotations

import argparse
import ast
import importlib
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from keeper_core.cli import build_parser
from keeper_core.errors import ConfigError
from keeper_train import commands
from keeper_train.config import load_config, parse_overrides
from keeper_train.jobs.demo import DemoConfig
from keeper_train.jobs.embed import EmbedConfig
from keeper_train.jobs.evaluate import EvaluateConfig
from keeper_train.jobs.promote import PromoteConfig
from keeper_train.jobs.train_head import TrainHeadConfig

OURS = (
    "corpus",
    "embed",
    "train-head",
    "demo",
    "evaluate",
    "promote",
    "pick",
    "finetune",
    "export",
    "select",
)
JOBS = Path(commands.__file__).parent / "jobs"


def subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def overrides_of(argv: list[str]) -> list[str]:
    """The ``key=value`` overrides ``keeper ARGV`` hands its job's ``main`` (the command run
    for real, the job's ``main`` replaced for the call; --config and --json left out)."""
    module = importlib.import_module(f"keeper_train.jobs.{JOB_CONFIGS[argv[0]][0]}")
    seen: list[list[str]] = []
    real = module.main
    module.main = lambda a: seen.append(list(a)) or 0
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    finally:
        module.main = real
    (forwarded,) = seen
    while forwarded[:1] in (["--config"], ["--json"]):
        forwarded = forwarded[2:]
    return forwarded


# keeper COMMAND -> (the module its flags go to as key=value overrides, its config class)
JOB_CONFIGS = {
    "embed": ("embed", "EmbedConfig"),
    "train-head": ("train_head", "TrainHeadConfig"),
    "finetune": ("finetune", "FinetuneConfig"),
    "pick": ("pick", "PickJobConfig"),
    "select": ("select", "SelectJobConfig"),
    "index": ("index", "IndexConfig"),
    "dedup": ("dedup", "DedupConfig"),
    "export-embeddings": ("export_embeddings", "ExportEmbeddingsConfig"),
    "feedback-export": ("feedback_export", "FeedbackExportConfig"),
    "feedback-from-xmp": ("xmp_feedback", "XmpFeedbackConfig"),
    "unpick": ("unpick", "UnpickConfig"),
    "ab-report": ("ab_report", "ABReportConfig"),
}


def _field(model: type[BaseModel], dotted: str) -> bool:
    name, _, rest = dotted.partition(".")
    for field_name, field in model.model_fields.items():
        if name in (field_name, field.alias):
            kinds = typing.get_args(field.annotation) or (field.annotation,)  # X | None: X
            models = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
            return not rest or any(_field(m, rest) for m in models)
    return False


@pytest.mark.parametrize("name", sorted(JOB_CONFIGS))
def test_every_flag_of_a_job_command_is_a_field_of_its_config(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Each flag goes to the job as the override of the field of its name (or the dotted one
    a command names): a flag whose field the config lacks would fail only when typed."""
    module_name, config_name = JOB_CONFIGS[name]
    module = importlib.import_module(f"keeper_train.jobs.{module_name}")
    seen: list[list[str]] = []
    monkeypatch.setattr(module, "main", lambda a: seen.append(list(a)) or 0)
    parser = subparser(name)
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config", "json"):
            continue
        value = "true" if action.nargs == 0 else str((action.choices or ["1"])[0])
        flag = action.option_strings[0]
        args = parser.parse_args([flag] if action.nargs == 0 else [flag, value])
        args.func(args)
        (key,) = (w.partition("=")[0] for w in seen.pop() if "=" in w)
        assert _field(getattr(module, config_name), key), f"keeper {name} {flag} -> {key}"


@pytest.mark.parametrize("name", OURS)
def test_every_flag_has_help_and_defaults_to_not_given(name: str) -> None:
    for action in subparser(name)._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = f"keeper {name} {'/'.join(action.option_strings) or action.dest}"
        assert (action.help or "").strip(), f"{label} has no help text"
        if action.option_strings and not action.required:
            # A default here would beat the config file's value (and the pydantic default).
            assert action.default is None, f"{label} defaults to {action.default!r}"


def test_embed_with_only_a_config_passes_no_override(tmp_path: Path) -> None:
    # The bug: --model defaulted to keeper-tiny:random and always overrode the YAML's model.
    cfg = tmp_path / "embed.yaml"
    cfg.write_text("input: photos/\noutput: emb/\nmodel: keeper-tiny:/w/tiny.safetensors\n")
    overrides = overrides_of(["embed", "--config", str(cfg)])
    assert overrides == []
    assert load_config(EmbedConfig, cfg, overrides).model == "keeper-tiny:/w/tiny.safetensors"

    # A flag typed does win, and the rest of the file stays.
    got = load_config(
        EmbedConfig, cfg, overrides_of(["embed", "--config", str(cfg), "--model", "keeper-tiny"])
    )
    assert (got.model, got.input, got.output) == ("keeper-tiny:random", "photos/", "emb/")


def test_embed_input_and_output_come_from_the_config_or_are_named(tmp_path: Path) -> None:
    args = build_parser().parse_args(["embed"])  # no longer an argparse error
    assert (args.input, args.output) == (None, None)
    with pytest.raises(ConfigError, match=r"input: Field required; output: Field required"):
        load_config(EmbedConfig, None, overrides_of(["embed"]))


def test_prune_flags_reach_embed_and_pick() -> None:
    from keeper_train.jobs.pick import PickJobConfig

    argv = ["embed", "--input", "p/", "--output", "e/", "--prune", "--max-prune-fraction", "1"]
    got = load_config(EmbedConfig, None, overrides_of(argv))
    assert (got.prune, got.max_prune_fraction) == (True, 1.0)
    argv = ["pick", "--input", "p/", "--output", "o/", "--prune"]
    assert load_config(PickJobConfig, None, overrides_of(argv)).prune is True


def test_train_head_flags_map_onto_the_config(tmp_path: Path) -> None:
    cfg = tmp_path / "th.yaml"
    cfg.write_text("embeddings: e/\nseries: s.csv\nepochs: 7\nuse_gpu: true\nregister: r\n")
    overrides = overrides_of(["train-head", "--config", str(cfg), "--no-use-gpu"])
    assert overrides == ["use_gpu=false"]
    got = load_config(TrainHeadConfig, cfg, overrides)
    assert (got.embeddings, got.series, got.epochs, got.use_gpu) == ("e/", "s.csv", 7, False)
    assert got.register_model == "r"
    with pytest.raises(ConfigError, match=r"embeddings: Field required; series: Field required"):
        load_config(TrainHeadConfig, None, [])


@pytest.mark.parametrize(
    ("argv", "job", "forwarded"),
    [
        (
            ["pick", "--config", "c.yaml", "--input", "p/", "--max-gap-s", "2.5", "limit=3"],
            "pick",
            ["--config", "c.yaml", "input='p/'", "grouping.max_gap_s=2.5", "limit=3"],
        ),
        (
            ["select", "--table", "t/", "--top-n", "5", "--vlm", "v/", "--vlm-device", "cpu"],
            "select",
            ["table='t/'", "cascade.top_n=5", "vlm.source='v/'", "vlm.device='cpu'"],
        ),
        (
            ["train-head", "--json", "r.json", "--seed", "3", "--use-gpu", "epochs=2"],
            "train_head",
            ["--json", "r.json", "seed=3", "use_gpu=true", "epochs=2"],
        ),
        (
            ["finetune", "--method", "lora", "--no-use-gpu", "--ray-address", "auto"],
            "finetune",
            ["method='lora'", "use_gpu=false", "ray_address='auto'"],
        ),
        (["embed", "--output", "o/", "--input", "i/"], "embed", ["input='i/'", "output='o/'"]),
        (["index", "--table", "t/", "--rebuild"], "index", ["table='t/'", "rebuild=true"]),
        (["dedup", "--similarity", "0.9"], "dedup", ["similarity=0.9"]),
        (["export-embeddings", "--dtype", "float32"], "export_embeddings", ["dtype='float32'"]),
        (["feedback-export", "--pairs", "since=x"], "feedback_export", ["pairs=true", "since=x"]),
        (["feedback-from-xmp", "--run", "r/"], "xmp_feedback", ["run='r/'"]),
        (["ab-report", "--json-out", "j.json"], "ab_report", ["json_out='j.json'"]),
    ],
)
def test_a_command_runs_its_job_with_the_flags_given_then_the_overrides(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], job: str, forwarded: list[str]
) -> None:
    """What ``keeper CMD ...`` hands ``python -m keeper_train.jobs.JOB``: --config and --json
    first, each flag typed as its (dotted) field's override, then the overrides typed."""
    module = importlib.import_module(f"keeper_train.jobs.{job}")
    seen: list[list[str]] = []
    monkeypatch.setattr(module, "main", lambda a: seen.append(list(a)) or 7)
    args = build_parser().parse_args(argv)
    assert args.func(args) == 7
    assert seen == [forwarded]


@pytest.mark.parametrize("value", ["on", "123", "it's", "a: b", "s3://b/x?y=1", "null"])
def test_string_flags_stay_strings_through_the_overrides(value: str) -> None:
    assert parse_overrides(commands.as_overrides({"input": value})) == {"input": value}
    assert parse_overrides(commands.as_overrides({"n": 3, "f": True})) == {"n": 3, "f": True}


def test_typed_configs_hold_the_defaults() -> None:
    parse = build_parser().parse_args
    keys = ["name", "embeddings", "series", "min_gain", "ci_gate", "confidence", "version"]
    args = parse(["promote", "k", "--embeddings", "e", "--series", "s"])
    got = commands.validated(PromoteConfig, commands.given(args, [*keys, "force", "rollback"]))
    assert (got.min_gain, got.ci_gate, got.confidence, got.data_dir) == (
        0.01,
        True,
        0.95,
        "keeper-data",
    )
    args = parse(["promote", "k", "--rollback", "--min-gain", "0", "--no-ci-gate"])
    got = commands.validated(PromoteConfig, commands.given(args, [*keys, "rollback"]))
    assert (got.rollback, got.min_gain, got.ci_gate) == (True, 0.0, False)

    args = parse(["evaluate", "--model", "m", "--embeddings", "e", "--series", "s"])
    keys = ["model", "embeddings", "series", "html", "report_series", "json_out"]
    got_e = commands.validated(EvaluateConfig, commands.given(args, keys))
    assert (got_e.report_series, got_e.html, got_e.json_out) == (60, None, None)

    args = parse(["demo", "--epochs", "3"])
    got_d = commands.validated(DemoConfig, commands.given(args, ["out", "epochs", "series"]))
    assert (got_d.out, got_d.epochs, got_d.series, got_d.model) == (
        "keeper-demo",
        3,
        150,
        "keeper-tiny:random",
    )


def test_validated_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"invalid PromoteConfig: min_gain: .*\[-1, 1\]"):
        commands.validated(PromoteConfig, {"name": "k", "rollback": True, "min_gain": 5})
    with pytest.raises(ConfigError, match="embeddings and series are required"):
        commands.validated(PromoteConfig, {"name": "k"})
    with pytest.raises(ConfigError, match="force needs version"):
        commands.validated(
            PromoteConfig, {"name": "k", "embeddings": "e", "series": "s", "force": True}
        )
    with pytest.raises(ConfigError, match="report_series"):
        commands.validated(
            EvaluateConfig, {"model": "m", "embeddings": "e", "series": "s", "report_series": 0}
        )


def _imports(tree: Path | ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(tree.read_text()) if isinstance(tree, Path) else tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_jobs_do_not_import_the_parsers() -> None:
    # commands imports the jobs (lazily, when a command runs); the jobs never import commands.
    for job in sorted(JOBS.glob("*.py")):
        assert "keeper_train.commands" not in _imports(job), job.name
    body = ast.parse(Path(commands.__file__).read_text()).body
    top = [m for n in body if isinstance(n, ast.Import | ast.ImportFrom) for m in _imports(n)]
    assert not [m for m in top if m.startswith("keeper_train.jobs")]


def test_keeper_help_is_import_light() -> None:
    code = (
        "import sys\n"
        "from keeper_core.cli import build_parser\n"
        "build_parser()\n"
        "print(sorted(m for m in ('torch', 'ray', 'pandas', 'mlflow', 'open_clip', 'keeper_train.jobs')"
        " if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_python_m_job_is_the_keeper_command(capsys: pytest.CaptureFixture[str]) -> None:
    from keeper_train.jobs import promote

    with pytest.raises(SystemExit) as e:
        promote.main(["--help"])
    assert e.value.code == 0
    assert "usage: keeper promote" in capsys.readouterr().out
