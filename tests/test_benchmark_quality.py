"""The learning-at-length benchmark on the CPU: each experiment end to end at toy sizes (a few
steps, JSON + PNG + table), and its metric on cases with a known answer."""

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmark_loader import load_benchmark
from torch import nn

from mmlongnet.attention import MultiheadDilatedAttention
from mmlongnet.data import AssociativeRecall

bench = load_benchmark("quality")
PNG = b"\x89PNG\r\n\x1a\n"


def smoke(tmp_path, experiment: str, *extra: str) -> dict:
    argv = [experiment, "--smoke", "--device", "cpu", "--out", str(tmp_path), "--tag", "t",
            "--max-steps", "2", "--time-budget", "60", *extra]  # fmt: skip
    assert bench.main(argv) == 0
    assert (tmp_path / f"quality_{experiment}_t.png").read_bytes()[:8] == PNG
    assert not (tmp_path / f"quality_{experiment}_t.json.part").exists()
    data = json.loads((tmp_path / f"quality_{experiment}_t.json").read_text())
    replot = tmp_path / "replotted.png"  # from the JSON, whose keys are strings: plotted as numbers
    bench.plot(experiment, data["results"], bench.parse_args([experiment, "--smoke"]), replot)
    assert replot.read_bytes()[:8] == PNG
    return data


# --- metrics on known answers ---


def test_per_question_accuracy_on_a_fixed_table():
    questions = ["first", "first", "last", "count", "count", "count"]
    correct = [True, False, True, True, True, False]
    table = bench.grouped_accuracy(questions, correct)
    assert table["first"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert table["last"] == {"n": 1, "correct": 1, "accuracy": 1.0}
    assert table["count"]["accuracy"] == pytest.approx(2 / 3)
    assert table["all"] == {"n": 6, "correct": 4, "accuracy": pytest.approx(4 / 6)}
    with pytest.raises(ValueError, match="length"):
        bench.grouped_accuracy(questions, correct[:-1])


def test_accuracy_by_distance_buckets_hand_made_predictions():
    distances = torch.tensor([1, 10, 100, 600, 3000, 5000, 9000])
    correct = torch.tensor([True, False, True, True, False, False, True])
    rows = bench.accuracy_by_distance(distances, correct, [0, 16, 1024, 8192])
    assert [row["bucket"] for row in rows] == ["0-16", "16-1K", "1K-8K"]
    assert [(row["n"], row["correct"]) for row in rows] == [(2, 1), (2, 2), (2, 0)]  # 9000 is past the edges
    assert [row["accuracy"] for row in rows] == [0.5, 1.0, 0.0]
    empty = bench.accuracy_by_distance(distances, correct, [20000, 30000])
    assert empty[0]["n"] == 0 and empty[0]["accuracy"] is None


def test_accuracy_by_residue_counts_far_queries_by_distance_to_the_value_mod_the_rate():
    distances = torch.tensor([3, 65, 66, 69, 73, 74, 100])  # (d - 1) % 4: 2, 0, 1, 0, 0, 1, 3
    correct = torch.tensor([True, True, False, True, False, True, False])
    rows = bench.accuracy_by_residue(distances, correct, modulus=4, beyond=64)  # 3 is not far
    assert rows[0] == {"n": 3, "correct": 2, "accuracy": pytest.approx(2 / 3)}
    assert rows[1] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert rows[2] is None
    assert rows[3] == {"n": 1, "correct": 0, "accuracy": 0.0}


def test_bits_per_byte_of_a_uniform_model_is_8_and_of_a_half_sure_one_is_1():
    targets = torch.randint(0, 256, (3, 40))
    uniform = torch.zeros(3, 40, 256)  # (B, N, V)
    rows = bench.bits_by_position(bench.token_nats(uniform, targets), [0, 4, 16, 40])
    assert [row["bits_per_byte"] for row in rows] == [pytest.approx(8.0)] * 3
    assert [row["tokens"] for row in rows] == [12, 36, 72]
    # from position 4 on, the target gets probability 1/2 (the other 255 share the rest): 1 bit
    half = uniform.clone()
    half[:, 4:].scatter_(-1, targets[:, 4:, None], math.log(255))
    rows = bench.bits_by_position(bench.token_nats(half, targets), [0, 4, 16, 40])
    assert [row["bits_per_byte"] for row in rows] == [pytest.approx(8.0), pytest.approx(1.0, abs=1e-4)] + [
        pytest.approx(1.0, abs=1e-4)
    ]  # float32 log-softmax


def test_window_gains_and_their_paired_difference_on_known_windows():
    nats = torch.zeros(3, 40)
    nats[:, :4] = math.log(2) * torch.tensor([[2.0], [3.0], [4.0]])  # first bucket: 2, 3, 4 bits
    nats[:, 16:] = math.log(2)  # last bucket: 1 bit in every window
    gains = bench.window_gains(nats, [0, 4, 16, 40])
    assert gains.tolist() == pytest.approx([-1.0, -2.0, -3.0])
    assert bench.mean_and_error(gains.tolist()) == {"n": 3, "mean": pytest.approx(-2.0),
                                                   "stderr": pytest.approx(1 / math.sqrt(3))}  # fmt: skip
    assert bench.mean_and_error([0.5])["stderr"] is None
    # paired over the windows both were tested on: the baseline's third window is missing
    difference = bench.paired_gain_difference([-1.0, -2.0, -3.0], [-1.0, -1.0])
    assert difference == {"n": 2, "mean": pytest.approx(-0.5), "stderr": pytest.approx(0.5)}
    assert bench.plus_minus(difference) == "-0.500 ± 0.500"


def test_time_schedule_and_curriculum():
    assert bench.lr_factor(0, 0.0, 10, 0.1) == pytest.approx(0.1)  # warm-up by steps
    assert bench.lr_factor(10, 0.0, 10, 0.1) == pytest.approx(1.0)
    assert bench.lr_factor(50, 0.5, 10, 0.1) == pytest.approx(0.55)  # cosine by time
    assert bench.lr_factor(50, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert [bench.curriculum_stage(p, 3, "grow") for p in (0.0, 0.34, 0.67, 1.0)] == [0, 1, 2, 2]
    assert bench.curriculum_stage(0.0, 3, "mixed") == 2


def test_the_peak_rate_holds_until_the_decay_share_and_stages_take_their_time_shares():
    for progress in (0.0, 0.3, 0.7):  # before the last 30%: the peak
        assert bench.lr_factor(50, progress, 10, 0.1, decay_share=0.3) == pytest.approx(1.0)
    assert bench.lr_factor(50, 0.85, 10, 0.1, decay_share=0.3) == pytest.approx(0.55)  # half-way down
    assert bench.lr_factor(50, 1.0, 10, 0.1, decay_share=0.3) == pytest.approx(0.1)
    assert bench.lr_factor(5, 0.9, 10, 0.1, decay_share=0.3) == pytest.approx(0.6)  # warm-up first
    shares = [1, 1, 2]  # ends at 0.25, 0.5, 1
    stages = [bench.curriculum_stage(p, 3, "grow", shares) for p in (0.0, 0.24, 0.25, 0.49, 0.5, 0.99, 1.0)]
    assert stages == [0, 0, 1, 1, 2, 2, 2]
    assert bench.curriculum_stage(0.1, 3, "mixed", shares) == 2
    # a model trained on fewer lengths (the dense one) keeps the first shares: 1 and 1 of 2
    dense = bench.Curriculum([4, 16], lambda n: iter(lambda: n, None), "grow", stage_shares=shares)
    rng = np.random.default_rng(0)
    assert dense(0.49, rng) == (4, 4) and dense(0.51, rng)[0] in (4, 16) and dense.stage == 1


def test_stage_and_decay_shares_are_checked():
    args = bench.parse_args(
        ["avdigits", "--digits", "4", "16", "--stage-shares", "1", "3", "--decay-share", "0.2"]
    )
    assert args.stage_shares == [1.0, 3.0] and args.decay_share == 0.2
    assert bench.parse_args(["recall"]).decay_share == 1.0 and bench.parse_args(["bytes"]).decay_share == 1.0
    for argv in (
        ["avdigits", "--digits", "4", "16", "--stage-shares", "1"],  # one share per length
        ["avdigits", "--digits", "4", "16", "--stage-shares", "1", "0"],  # every share > 0
        ["avdigits", "--curriculum", "mixed", "--stage-shares", "1", "1", "1", "1", "1"],
        ["bytes", "--stage-shares", "1"],  # no curriculum
        ["recall", "--decay-share", "0"],
        ["recall", "--decay-share", "1.5"],
    ):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def test_a_learned_stage_ends_early_and_time_still_ends_the_others():
    curriculum = bench.Curriculum([4, 16, 64], lambda n: iter(lambda: f"batch{n}", None), "grow", 0.5)
    rng = np.random.default_rng(0)
    assert curriculum(0.0, rng) == (4, "batch4") and curriculum.stage == 0
    for loss in (0.4, 0.3, 0.9, 0.4, 0.4):  # a read above resets the run: not yet 3 in a row
        curriculum.record(4, loss)
    assert curriculum(0.1, rng)[0] == 4 and curriculum.stage == 0
    curriculum.record(4, 0.2)  # the third read below in a row: 16 joins
    assert curriculum(0.1, rng)[0] in (4, 16) and curriculum.stage == 1
    for _ in range(5):
        curriculum.record(4, 0.0)  # reads at the older length do not end the stage
    assert curriculum(0.1, rng) and curriculum.stage == 1
    assert curriculum(0.7, rng) and curriculum.stage == 2  # time ends it at the latest
    for _ in range(3):
        curriculum.record(64, 0.0)  # the last stage has no next one
    assert curriculum(0.9, rng) and curriculum.stage == 2
    by_time = bench.Curriculum([4, 16], lambda n: iter(lambda: n, None), "grow")
    for _ in range(5):
        by_time.record(4, 0.0)  # without advance_loss, time alone
    assert by_time(0.2, rng) == (4, 4) and by_time.stage == 0


def test_the_newest_length_takes_its_share_of_the_batches():
    rng = np.random.default_rng(0)
    newest = bench.Curriculum([4, 16, 64], lambda n: iter(lambda: n, None), "mixed", newest_share=0.8)
    drawn = [newest(0.0, rng)[0] for _ in range(4000)]
    assert drawn.count(64) / 4000 == pytest.approx(0.8, abs=0.03)
    assert drawn.count(4) / 4000 == pytest.approx(0.1, abs=0.03)


def test_advance_loss_needs_the_grow_curriculum_and_logs_when_each_stage_began(tmp_path, one_thread):
    with pytest.raises(SystemExit):
        bench.parse_args(["avdigits", "--curriculum", "mixed", "--advance-loss", "0.5"])
    with pytest.raises(SystemExit):
        bench.parse_args(["bytes", "--advance-loss", "0.5"])
    with pytest.raises(SystemExit):
        bench.parse_args(["bytes", "--newest-share", "0.5"])
    with pytest.raises(SystemExit):
        bench.parse_args(["avdigits", "--newest-share", "0"])
    assert bench.parse_args(["avdigits", "--newest-share", "0.6"]).newest_share == 0.6
    argv = ["avdigits", "--smoke", "--models", "dilated", "--max-steps", "12", "--log-every", "1",
            "--advance-loss", "100", "--out", str(tmp_path)]  # fmt: skip
    assert bench.main(argv) == 0
    result = json.loads(next(tmp_path.glob("*.json")).read_text())["results"]["dilated"]["train"]
    # every loss reads below 100: K = 4 joins after the reads of steps 1, 2 and 3 at K = 2, at step
    # 3 (the time would have added it at step 6 of 12)
    assert [[step, K] for _, step, K in result["stages"]] == [[0, 2], [3, 4]]


def test_the_log_says_how_long_training_waited_for_each_lengths_batches():
    argv = ["recall", "--smoke", "--device", "cpu", "--max-steps", "20", "--curriculum", "mixed"]
    args = bench.parse_args(argv)

    def loader(length):  # batches of 1; those of length 16 take 20 ms each
        while True:
            time.sleep(0.02 if length == 16 else 0.0)
            yield torch.zeros(1)

    curriculum = bench.Curriculum([8, 16], loader, "mixed")
    log = bench.train_for(nn.Linear(2, 1), curriculum, lambda f, b: f(torch.ones(1, 2)).sum(), 60.0, args,
                          torch.device("cpu"))  # fmt: skip
    assert set(log.batch_wait) == set(log.samples) == {8, 16}
    assert log.batch_wait[16] >= 0.02 * log.samples[16] > 0.0
    assert log.batch_wait[8] < 0.01 * log.samples[8]
    assert "s waiting for batches" in log.summary()


def test_training_stops_at_the_first_loss_that_is_not_finite():
    args = bench.parse_args(["recall", "--smoke", "--device", "cpu", "--max-steps", "10", "--log-every", "2"])
    model, calls = nn.Linear(2, 1), []

    def loss_fn(forward, batch):  # finite for 4 steps, then NaN
        calls.append(batch)
        loss = forward(torch.ones(1, 2)).square().sum()
        return loss * math.nan if len(calls) > 4 else loss

    curriculum = bench.Curriculum([8], lambda n: iter(lambda: torch.zeros(1), None), "grow")  # batches of 1
    log = bench.train_for(model, curriculum, loss_fn, 60.0, args, torch.device("cpu"))
    # reads at steps 1, 2, 4 (finite), 6 (NaN): training stops there
    assert log.steps == 6 and len(calls) == 6 and log.diverged[1:] == [6, 8]
    assert [step for _, step, _ in log.curve] == [1, 2, 4, 6] and math.isnan(log.final_loss)
    assert "STOPPED at step 6" in log.summary() and "length 8" in log.summary()
    assert bench.train_for(nn.Linear(2, 1), curriculum, lambda f, b: f(torch.ones(1, 2)).sum(), 60.0, args,
                           torch.device("cpu")).diverged is None  # fmt: skip


class RecallOracle(nn.Module):
    """Answers each token with the token that followed its previous occurrence: perfect recall."""

    def forward(self, tokens):  # (B, N) -> (B, N, V)
        logits = torch.zeros(*tokens.shape, 200)
        for b, row in enumerate(tokens.tolist()):
            after = {}
            for i, token in enumerate(row):
                if token in after:
                    logits[b, i, after[token]] = 1.0
                if i + 1 < len(row):
                    after[token] = row[i + 1]
        return logits


def test_recall_evaluation_of_a_perfect_and_a_constant_model():
    args = bench.parse_args(["recall", "--smoke"])
    perfect = bench.recall_evaluate(RecallOracle(), 128, args, torch.device("cpu"), deadline=math.inf)
    assert perfect["queries"] == args.eval_sequences * args.queries
    assert perfect["accuracy"] == 1.0
    assert all(row["accuracy"] == 1.0 for row in perfect["by_distance"] if row["n"])
    assert sum(row["n"] for row in perfect["by_distance"]) == perfect["queries"]
    assert len(perfect["by_residue"]) == max(args.rates)
    assert all(row["accuracy"] == 1.0 for row in perfect["by_residue"] if row is not None)

    class Constant(nn.Module):  # always answers value 0
        def forward(self, tokens):
            return torch.zeros(*tokens.shape, 200).index_fill_(-1, torch.tensor([0]), 1.0)

    constant = bench.recall_evaluate(Constant(), 128, args, torch.device("cpu"), deadline=math.inf)
    data = AssociativeRecall(bench.recall_config(args, 128, args.seed + 10**6), args.eval_sequences)
    answers = torch.cat([s["targets"][s["targets"] >= 0] for s in data])
    assert constant["accuracy"] == pytest.approx(float((answers == 0).float().mean()))


def test_embedding_std_and_token_shift_default_per_experiment_and_reach_the_lm():
    recall, text = bench.parse_args(["recall"]), bench.parse_args(["bytes"])
    assert recall.embedding_std == 4.0 and text.embedding_std == bench.TIED
    assert recall.token_shift == max(recall.rates) + 1 and text.token_shift == 0
    untied = bench.lm_for(bench.parse_args(["recall", "--smoke"]), "dilated", 64)
    assert untied.embedding.weight.std().item() == pytest.approx(4.0, rel=0.1)
    assert untied.lm_head.weight is not untied.embedding.weight
    assert untied.token_shift.width == 9
    assert untied.token_shift.window_share == 0.5 and untied.config.positions is None  # recall's defaults
    assert recall.positions == "none" and text.positions == "rope" and text.token_shift_window == 0.0
    learned_args = bench.parse_args(["recall", "--smoke", "--token-shift-window", "0"])
    learned = bench.lm_for(learned_args, "dilated", 64)
    assert learned.token_shift.window_share == 0.0
    rotated = bench.parse_args(["recall", "--positions", "rope", "--rotary-fraction", "0.5"])
    assert bench.lm_for(rotated, "dilated", 64).config.rotary_fraction == 0.5
    for bad in (["--rotary-fraction", "0.5"], ["--token-shift-window", "1.5"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["recall", *bad])
    assert bench.lm_for(bench.parse_args(["bytes", "--smoke"]), "local", 64).token_shift is None
    assert (
        bench.lm_for(bench.parse_args(["recall", "--smoke", "--token-shift", "0"]), "dense", 64).token_shift
        is None
    )
    args = bench.parse_args(["recall", "--smoke", "--embedding-std", "tied"])
    tied = bench.lm_for(args, "dilated", 64)
    assert tied.lm_head.weight is tied.embedding.weight
    assert bench.parse_args(["bytes", "--embedding-std", "0.5"]).embedding_std == 0.5
    for bad in ("0", "-1", "inf", "nan", "big"):
        with pytest.raises(SystemExit):
            bench.parse_args(["recall", "--embedding-std", bad])


def test_loader_workers_default_to_the_cores_beside_a_gpu(monkeypatch):
    for cores, workers in ((16, 8), (64, 8), (6, 4), (2, 1), (None, 1)):
        monkeypatch.setattr(bench.os, "cpu_count", lambda cores=cores: cores)
        assert bench.parse_args(["avdigits", "--device", "cuda"]).workers == workers
        assert bench.parse_args(["avdigits", "--device", "cpu"]).workers == 0
    assert bench.parse_args(["recall", "--device", "cuda", "--workers", "3"]).workers == 3


def test_tested_gives_each_size_its_share_of_the_time_left(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    deadlines = {}

    def evaluate(size, deadline):
        deadlines[size] = deadline
        clock[0] += {4: 1.0, 16: 8.0, 64: 30.0}[size]  # 4 quick, 16 up to its deadline, 64 past it
        return {"size": size}

    result = bench.tested(nn.Linear(2, 3), bench.TrainLog(), 30.0, evaluate, [4, 16, 64])
    assert result["test"] == {4: {"size": 4}, 16: {"size": 16}, 64: {"size": 64}}
    assert result["parameters"] == 9
    # 4: a third of 30 s; 16: half of the 29 s left; 64: what is left then (21 s)
    assert deadlines == {4: pytest.approx(110.0), 16: pytest.approx(115.5), 64: pytest.approx(130.0)}
    assert result["eval_seconds"] == 39.0


# --- the three experiments end to end ---


def test_avdigits_runs_every_model_and_reports_per_k_and_question(tmp_path, capsys, one_thread):
    data = smoke(tmp_path, "avdigits")
    results, options = data["results"], data["meta"]["options"]
    assert set(results) == {"dilated", "dense", "local"} and options["digits"] == [2, 4]
    for kind, result in results.items():
        assert result["train"]["steps"] == 2 and result["parameters"] > 0
        assert 0 <= result["eval_seconds"] <= data["meta"]["seconds"]
        expected = ["2"] if kind == "dense" else ["2", "4"]  # dense up to --dense-max-digits (2 when smoke)
        assert list(result["test"]) == expected
        for metrics in result["test"].values():
            table = metrics["accuracy"]
            assert table["all"]["n"] == options["eval_examples"]
            assert sum(table[q]["n"] for q in table if q != "all") == table["all"]["n"]
            assert set(table) - {"all"} <= {"first", "last", "count"}
            assert table["all"]["accuracy"] == table["all"]["correct"] / table["all"]["n"]
            views = metrics["by_view"]  # the same predictions, split by the views each sample had
            assert set(views) <= {"both", "audio", "video"}
            for key in ("n", "correct"):
                assert sum(view["all"][key] for view in views.values()) == table["all"][key]
                for question in set(table) - {"all"}:
                    in_views = sum(view[question][key] for view in views.values() if question in view)
                    assert in_views == table[question][key]
    out = capsys.readouterr().out
    assert "| K | fused tokens | model |" in out and "| K | model | views | samples |" in out


def test_avdigits_tests_k_it_did_not_train_and_says_so(tmp_path, capsys, one_thread):
    data = smoke(tmp_path, "avdigits", "--models", "dilated", "--digits", "2", "--test-digits", "4", "2")
    assert list(data["results"]["dilated"]["test"]) == ["2", "4"]
    assert data["results"]["dilated"]["train"]["samples"].keys() == {"2"}  # 4 tested only
    out = capsys.readouterr().out
    table = out[out.index("| K | fused tokens") :].split("\n\n")[0]  # the first table
    rows = {line.split("|")[1].strip(): line.split("|") for line in table.splitlines()
            if line.startswith("| 2 |") or line.startswith("| 4 (not trained) |")}  # fmt: skip
    assert rows.keys() == {"2", "4 (not trained)"}
    assert rows["2"][5].strip() == str(data["results"]["dilated"]["train"]["samples"]["2"])  # samples
    assert rows["4 (not trained)"][5].strip() == "0"


@pytest.mark.parametrize(("argv", "positions", "rotary_dim"), [([], "rope", 4), (["--rotary-fraction", "1"],
                         "rope", 8), (["--positions", "none"], None, None)])  # fmt: skip
def test_avdigits_positions_reach_the_model(argv, positions, rotary_dim):
    args = bench.parse_args(["avdigits", "--smoke", "--device", "cpu", *argv])
    config = bench.av_model_config(args, "dilated")
    assert config.positions == positions and config.rotary_fraction == args.rotary_fraction
    layer = config.layer_config(config.fusion_stack)
    model = bench.MultimodalClassifier(config, num_classes=10)
    attention = next(m for m in model.modules() if isinstance(m, MultiheadDilatedAttention))
    assert getattr(attention.positions, "rotary_dim", None) == rotary_dim and layer.positions == positions
    assert args.rotary_fraction == {"rope": 0.5 if not argv else 1.0, None: 1.0}[positions]
    assert bench.parse_args(["recall", "--positions", "rope"]).rotary_fraction == 1.0  # recall rotates all
    with pytest.raises(SystemExit):
        bench.parse_args(["avdigits", "--positions", "xpos", "--rotary-fraction", "0.5"])


@pytest.mark.parametrize("experiment", ["avdigits", "recall", "bytes"])
def test_scalable_softmax_reaches_every_self_attention(experiment):
    args = bench.parse_args([experiment, "--smoke", "--device", "cpu", "--scalable-softmax", "64"])
    if experiment == "avdigits":
        model = bench.MultimodalClassifier(bench.av_model_config(args, "dilated"), num_classes=10)
    else:
        model = bench.lm_for(args, "dilated", 16)
    attentions = [m for m in model.modules() if isinstance(m, MultiheadDilatedAttention)]
    assert attentions and all(m.length_scale.reference_length == 64 for m in attentions)
    plain = bench.parse_args([experiment, "--smoke", "--device", "cpu"])
    assert plain.scalable_softmax is None
    with pytest.raises(SystemExit):
        bench.parse_args([experiment, "--scalable-softmax", "1"])


def test_avdigits_boundary_embeddings_and_global_modalities_reach_the_model():
    args = bench.parse_args(["avdigits", "--boundary-embeddings", "--global-modalities", "text"])
    config = bench.av_model_config(args, "local")
    assert config.boundary_embeddings is True and config.global_modalities == ["text"]
    shared = bench.av_model_config(
        bench.parse_args(["avdigits", "--boundary-embeddings", "shared"]), "dilated"
    )
    assert shared.boundary_embeddings == "shared"
    plain = bench.av_model_config(bench.parse_args(["avdigits"]), "dilated")
    assert plain.boundary_embeddings is False and plain.global_modalities == []
    assert not config.global_read and not plain.global_read
    read = bench.parse_args(["avdigits", "--global-modalities", "text", "--global-read"])
    assert bench.av_model_config(read, "dilated").global_read
    for argv in (["--global-modalities", "depth"], ["--global-read"], ["--global-models", "dilated"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["avdigits", *argv])


def test_avdigits_global_models_keep_the_other_baselines_plain():
    argv = ["avdigits", "--global-modalities", "text", "video", "--global-read", "--global-models", "dilated"]
    args = bench.parse_args(argv)
    dilated, local = (bench.av_model_config(args, kind) for kind in ("dilated", "local"))
    assert dilated.global_modalities == ["text", "video"] and dilated.global_read
    assert local.global_modalities == [] and not local.global_read
    every = bench.parse_args(argv[:-2])  # no --global-models: every model
    assert bench.av_model_config(every, "local").global_modalities == ["text", "video"]
    with pytest.raises(SystemExit):
        bench.parse_args([*argv[:-1], "recurrent"])


def test_avdigits_audio_subsampling_halves_the_audio_tokens():
    fine, default = (bench.parse_args(["avdigits", *argv]) for argv in (["--audio-subsampling", "4"], []))
    assert default.audio_subsampling == 8 and bench.av_model_config(default, "dilated").audio.subsampling == 8
    assert bench.av_model_config(fine, "dilated").audio.subsampling == 4
    assert bench.av_tokens_per_sample(256, fine) == 40 + 256 * (13 + 1)
    assert bench.av_tokens_per_sample(256, default) == 40 + 256 * (7 + 1)  # ceil(13 / 2) audio tokens a digit
    with pytest.raises(SystemExit):
        bench.parse_args(["avdigits", "--audio-subsampling", "3"])


def test_avdigits_schedules_of_the_baselines():
    args = bench.parse_args(["avdigits"])
    dense, local = bench.av_schedules(args, "dense"), bench.av_schedules(args, "local")
    assert dense["fusion_stack"]["segment_lengths"] == [bench.DENSE_SEGMENT] and dense["fusion_stack"][
        "dilation_rates"
    ] == [1]
    assert local["fusion_stack"]["segment_lengths"] == [256] and local["audio_stack"]["segment_lengths"] == [
        256
    ]
    assert bench.av_schedules(args, "dilated")["fusion_stack"]["segment_lengths"] == [256, 1024, 4096, 16384]


def test_avdigits_compiled_training_pads_every_batch_of_a_k_to_one_shape():
    args = bench.parse_args(["avdigits", "--smoke", "--device", "cpu", "--compile", "--batch-size", "2"])
    loader = bench.av_loader(8, "train", 40, args, torch.device("cpu"))
    shapes = {tuple((name, tuple(x.shape)) for name, x in batch.inputs.items()) for batch, _ in loader}
    assert len(shapes) <= 3  # one per set of modalities present (a batch of 2 may lack one)
    assert len({dict(shape)["audio"] for shape in shapes if "audio" in dict(shape)}) == 1
    assert len({dict(shape)["video"] for shape in shapes if "video" in dict(shape)}) == 1


def test_avdigits_question_weights_shape_training_only():
    weights = ["--train-question-weights", "0", "1", "3"]
    args = bench.parse_args(["avdigits", "--smoke", "--device", "cpu", *weights])
    train = bench.av_loader(2, "train", 8, args, torch.device("cpu")).dataset.config
    test = bench.av_loader(2, "test", 8, args, torch.device("cpu")).dataset.config
    assert train.question_mix == {"first": 0.0, "last": 0.25, "count": 0.75}
    assert test.question_mix is None  # tested on equal shares
    assert bench.parse_args(["avdigits"]).train_question_weights is None
    for bad in (["1", "2"], ["1", "-1", "1"], ["0", "0", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["avdigits", "--train-question-weights", *bad])


def test_avdigits_view_weights_shape_training_only():
    args = bench.parse_args(["avdigits", "--smoke", "--device", "cpu", "--train-view-weights", "0", "1", "3"])
    train = bench.av_loader(2, "train", 40, args, torch.device("cpu"))
    assert train.dataset.config.modality_mix == {"both": 0.0, "audio": 0.25, "video": 0.75}
    views = [view for _, kinds in train for _, view in kinds]
    assert "both" not in views and {"audio", "video"} <= set(views)
    default = bench.AVDigitsConfig().modality_mix
    assert bench.av_loader(2, "test", 8, args, torch.device("cpu")).dataset.config.modality_mix == default
    assert bench.parse_args(["avdigits"]).train_view_weights is None
    for bad in (["1", "2"], ["1", "-1", "1"], ["0", "0", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["avdigits", "--train-view-weights", *bad])


def test_recall_runs_every_model_and_buckets_by_distance(tmp_path, capsys, one_thread):
    results = smoke(tmp_path, "recall")["results"]
    assert set(results) == {"dilated", "local", "dense"}
    assert list(results["dense"]["test"]) == ["64"]  # --dense-max-length 64 in the smoke run
    for result in results.values():
        assert result["eval_seconds"] >= 0
        for length, metrics in result["test"].items():
            rows = metrics["by_distance"]
            assert rows[-1]["high"] == int(length) and sum(row["n"] for row in rows) == metrics["queries"]
            assert metrics["queries"] == 4 * 4  # eval sequences x queries
    assert "| N | model | steps | all |" in capsys.readouterr().out


def test_recall_table_buckets_end_at_the_longest_length():
    args = bench.argparse.Namespace(lengths=[4096, 16384], distance_edges=[0, 512, 2048, 8192, 32768])
    header = bench.recall_table({}, args).splitlines()[0]
    assert header.endswith("| d 0-512 | d 512-2K | d 2K-8K | d 8K-16K |")


def trained_twice(tmp_path, capsys, experiment: str, option: str, *argv: str) -> dict[str, dict]:
    """The dilated model trained by `experiment` (--smoke, logging every step) without `option`
    and with it: per run ("eager", option's name), the training record and what was printed."""
    runs = {}
    for tag, extra in (("eager", []), (option.strip("-"), [option])):
        common = ["--smoke", "--device", "cpu", "--out", str(tmp_path), "--tag", tag, "--models", "dilated"]
        assert (
            bench.main([experiment, *common, "--log-every", "1", "--time-budget", "600", *argv, *extra]) == 0
        )
        data = json.loads((tmp_path / f"quality_{experiment}_{tag}.json").read_text())
        results = data["results"].get("models", data["results"])  # bytes keeps its models apart
        runs[tag] = {**results["dilated"]["train"], "printed": capsys.readouterr().out}
        runs[tag]["losses"] = [loss for _, _, loss in runs[tag]["curve"]]
    return runs


def test_compiled_recall_training_takes_the_eager_steps(tmp_path, capsys, one_thread):
    """--compile runs the same model through torch.compile, every length compiled before training
    (gradients discarded, the batch kept): the same losses, step by step."""
    runs = trained_twice(tmp_path, capsys, "recall", "--compile", "--lengths", "64", "--max-steps", "2")
    curves = {tag: run["losses"] for tag, run in runs.items()}
    compile_seconds = {tag: run["compile_seconds"] for tag, run in runs.items()}
    printed = {tag: run["printed"] for tag, run in runs.items()}
    assert len(curves["compile"]) == 2
    assert curves["compile"] == pytest.approx(curves["eager"], abs=1e-3)  # compiled first: same batches
    assert compile_seconds["compile"] > 0 and compile_seconds["eager"] == 0
    assert "[recall] dilated: 2 steps in " in printed["compile"]
    assert "s compiling)" in printed["compile"] and "compiling" not in printed["eager"]


def test_graphed_avdigits_training_takes_the_eager_steps(tmp_path, capsys, one_thread):
    """--graphed trains through the classifier's graphed steps (eager on the CPU): the same losses,
    step by step, as the usual loop; it refuses --compile."""
    runs = trained_twice(tmp_path, capsys, "avdigits", "--graphed", "--digits", "2", "--max-steps", "3")
    assert len(runs["graphed"]["losses"]) == 3
    assert runs["graphed"]["losses"] == pytest.approx(runs["eager"]["losses"], abs=1e-4)
    with pytest.raises(SystemExit):
        bench.parse_args(["avdigits", "--smoke", "--graphed", "--compile"])


@pytest.mark.parametrize(("experiment", "extra"), [("recall", ["--lengths", "64"]), ("bytes", [])])
def test_graphed_lm_training_takes_the_eager_steps(tmp_path, capsys, one_thread, experiment, extra):
    """--graphed trains the LMs through `GraphedSteps` (eager on the CPU): the same losses, step by
    step, as the usual loop (its own backward and clipping: the weights end alike too)."""
    runs = trained_twice(tmp_path, capsys, experiment, "--graphed", "--max-steps", "3", *extra)
    assert len(runs["graphed"]["losses"]) == 3
    assert runs["graphed"]["losses"] == pytest.approx(runs["eager"]["losses"], abs=1e-4)
    with pytest.raises(SystemExit):
        bench.parse_args([experiment, "--smoke", "--graphed", "--compile"])


def test_a_peeked_batch_is_the_next_one_of_its_length():
    counter = iter(range(100))
    curriculum = bench.Curriculum([8, 16], lambda n: (n * 1000 + next(counter) for _ in range(10)), "mixed")
    assert curriculum.peek(16) == 16000 and curriculum.peek(16) == 16000
    assert curriculum.batch(16) == 16000 and curriculum.batch(16) == 16001
    assert curriculum.batch(8) == 8002


def test_bytes_runs_both_models_and_reports_bits_by_position(tmp_path, capsys, one_thread):
    corpus = tmp_path / "corpus"
    for split_probe in range(12):  # files of 1,000 bytes, longer than the 256-byte smoke window
        (corpus / f"f{split_probe}").mkdir(parents=True)
        (corpus / f"f{split_probe}" / "a.txt").write_text(f"line {split_probe} of some text\n" * 50)
    data = smoke(tmp_path, "bytes", "--root", str(corpus), "--pattern", "*.txt")
    models = data["results"]["models"]
    assert set(models) == {"dilated", "local"}
    for result in models.values():
        assert result["eval_seconds"] >= 0
        test = result["test"]
        assert [row["bucket"] for row in test["by_position"]] == ["0-32", "32-128", "128-256"]
        assert [row["tokens"] for row in test["by_position"]] == [test["windows"] * w for w in (32, 96, 128)]
        assert 0 < test["bits_per_byte"] < 12
        bits = [row["bits_per_byte"] for row in test["by_position"]]
        assert test["gain"]["n"] == test["windows"] == len(test["window_gains"])
        assert test["gain"]["mean"] == pytest.approx(bits[-1] - bits[0], abs=1e-9)  # equal-length windows
    dilated, local = (models[kind]["test"]["window_gains"] for kind in ("dilated", "local"))
    difference = data["results"]["dilated_gain_minus_local"]
    assert difference["mean"] == pytest.approx(float(np.mean(dilated) - np.mean(local)), abs=1e-9)
    out = capsys.readouterr().out
    assert "| model | steps | windows | all |" in out


def test_avdigits_batches_carry_half_precision_media_by_default():
    cpu = torch.device("cpu")
    batches = {}
    for extra in ([], ["--media-dtype", "float32"]):
        args = bench.parse_args(["avdigits", "--smoke", "--device", "cpu", *extra])
        batches[args.media_dtype], _ = next(iter(bench.av_loader(2, "train", 8, args, cpu)))
    assert set(batches) == {"float16", "float32"}
    for name in ("audio", "video"):
        half, full = batches["float16"].inputs[name], batches["float32"].inputs[name]
        assert half.dtype == torch.float16 and torch.equal(half, full.half())


def test_recipe_file_parses_as_its_command_line_and_later_options_override(tmp_path):
    path = Path(__file__).resolve().parents[1] / "configs" / "quality_avdigits_h200.args"
    recipe = bench.parse_args([f"@{path}"])
    assert recipe.experiment == "avdigits" and recipe.digits == [4, 16, 64, 256]
    assert recipe.train_question_weights == [0.5, 1.0, 3.0] and recipe.train_view_weights == [1.0, 1.0, 2.0]
    assert recipe.global_modalities == ["text", "video"] and recipe.global_read
    assert recipe.global_models == ["dilated"] and recipe.modality_segments == [2048]
    assert recipe.time_budget == 545 and recipe.seed == 0
    overridden = bench.parse_args([f"@{path}", "--seed", "1", "--tag", "x"])
    assert overridden.seed == 1 and overridden.tag == "x"
    lines = tmp_path / "two.args"
    lines.write_text("recall  # the experiment\n--lengths 64 128 --tag 'a b'\n")
    args = bench.parse_args([f"@{lines}"])
    assert args.experiment == "recall" and args.lengths == [64, 128] and args.tag == "a b"
