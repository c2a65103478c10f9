"""The sampler benchmark (`python -m microforge_jax.bench.samplers`): its budgets, table and errors."""

import pytest

from microforge_jax import cli
from microforge_jax.bench import samplers


def test_budgets_give_heun_the_nearest_evaluation_count_fewer_on_a_tie():
    assert [samplers.steps_for("heun", n) for n in (1, 2, 8, 9, 12)] == [1, 1, 4, 5, 6]
    assert [samplers.evaluations("heun", samplers.steps_for("heun", n)) for n in (8, 9, 12)] == [7, 9, 11]
    for rule in ("euler", "dpm++2m"):
        assert samplers.evaluations(rule, samplers.steps_for(rule, 8)) == 8


def test_markdown_table_gives_mean_and_spread_per_row():
    rows = [
        {"sampler": "euler", "steps": 8, "nfe": 8, "latent": [0.1, 0.3], "image": [0.05, 0.05]},
        {"sampler": "heun", "steps": 4, "nfe": 7, "latent": [0.02], "image": [0.01]},
    ]
    lines = samplers.markdown_table(rows).splitlines()
    assert lines[0] == "| sampler | steps | NFE | latent distance (mean ± std) | image distance (mean ± std) |"
    assert lines[1] == "|---|---:|---:|---:|---:|"
    assert lines[2] == "| euler | 8 | 8 | 0.2000 ± 0.1414 | 0.0500 ± 0.0000 |"  # sample std over seeds
    assert lines[3] == "| heun | 4 | 7 | 0.0200 ± 0.0000 | 0.0100 ± 0.0000 |"  # one seed: no spread


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nfe", "8,x"], "--nfe must be comma-separated integers"),
        (["--nfe", "0"], "--nfe needs positive budgets"),
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--workdir", "{tmp}/nope"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys):
    argv = ["--workdir", str(tmp_path)] + [a.format(tmp=tmp_path) for a in args]
    assert cli.run(samplers.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err, err
