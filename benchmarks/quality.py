"""Learning at length: does a model with dilated attention use long context, against baselines
trained for the same time in the same run?

Three experiments, each one run within a wall-clock budget (`--time-budget`, 9 minutes by
default, start-up and evaluation included). The budget left after start-up is split equally
between the compared models; each trains for its share (less `--eval-share`, kept for its
evaluation), one after the other, with the same recipe, and is then evaluated on held-out data.
The learning rate warms up linearly over `--warmup-steps` steps and then decays on a cosine over
the model's training *time* (to `--min-lr-ratio` of `--lr`; with `--decay-share` it holds its peak
until that last share of the time and decays over it), so every model finishes its schedule when
its time is up, however fast it steps.

1. `avdigits`: the bundled AV digits task (`mmlongnet.data.AVDigitsDataset`, data/README.md)
   with K digits per example, K in `--digits` (4 16 64 256 1024: about 8 fused tokens a digit
   with the audio encoder's stride of 8, `--audio-subsampling`, so ~60 to ~8K fused tokens a
   sample; audio and video collated in float16, `--media-dtype`, so that the loaders keep up at
   long K). A `MultimodalClassifier` (`MMLongNet` + linear head; rotary positions on half of each
   head's channels, `--rotary-fraction 0.5`, the rest position-free, so that what it learns on
   short sequences holds at distances it never saw) is trained over a curriculum of K
   (`--curriculum grow`: the training time is split into one stage per K, equally or by
   `--stage-shares`, and each batch of stage
   s takes a K drawn uniformly from the first s + 1, or the newest in a share `--newest-share` of
   the batches) and tested at every K. Models: `dilated` (every
   stack with its dilated schedule), `dense` (every stack one segment of 2^24 tokens at rate 1:
   full attention over the stack's tokens; trained and tested on K <= `--dense-max-digits`) and
   `local` (every stack only its shortest segment, at rate 1).
   Reports test accuracy per K and per question type (`--questions`; first/last/count by default,
   all five with `--questions first last count after most`), also at K only tested
   (`--test-digits`).
2. `recall`: associative recall drawn on the fly (`mmlongnet.data.AssociativeRecall`): key-value
   pairs spread over sequences of `--lengths` tokens (4K 16K 64K), queries at the end. A causal
   `LongNetLM` (embeddings at std 4, untied; no position encoding, `--positions none`; a token
   shift of width 9, `--token-shift`, half of its channels fixed to the sum of the last 9 tokens,
   `--token-shift-window 0.5`, so that a branch of rate r <= 8 reaches a key-value pair from a
   query at any residue) is trained on the query answers over a curriculum of lengths, as above.
   Models:
   `dilated`, `local` (one 2K segment: `--local-window`) and `dense` (full causal attention, on
   lengths <= `--dense-max-length`). Reports accuracy per length and per bucket of the distance
   between a query and its pair (`--distance-edges`), and of the pairs beyond the first segment by
   (distance - 1) mod the largest rate (which residues the model reaches).
3. `bytes`: a byte-level `LongNetLM` on windows of `--window` bytes (32K) taken inside single
   files of a text corpus (the Python standard library's and torch's sources by default, split
   by file with `mmlongnet.data.text_files.split_text_files`; only files longer than the
   window). Models:
   `dilated` and `local` (one 2K segment), both trained on the same windows. Reports bits per
   byte on held-out files by position in the window (`--position-edges`: 0-2K, 2K-8K, 8K-32K):
   a model that uses long context predicts late bytes better than early ones.

Every option has its default in `parse_args` (the one source of truth; `--help` lists them);
`--smoke` shrinks everything to toy sizes that run on a CPU in seconds (the tests' twin).

Writes `<out>/quality_<experiment>_<tag>.json` (the run's metadata, the options, per model its
training log and its metrics) and `.png`, and prints a markdown table last.

    python benchmarks/quality.py avdigits --tag h200
    python benchmarks/quality.py avdigits --questions first last count after most --tag h200_all
    python benchmarks/quality.py recall --tag h200
    python benchmarks/quality.py bytes --tag h200
    python benchmarks/quality.py @configs/quality_avdigits_h200.args   # the recipe that meets the bar
    python benchmarks/quality.py recall --smoke --device cpu     # toy sizes, seconds on a CPU
"""

# B batch, N tokens of a sequence, K digits per example, L fused tokens, V vocabulary,
# W segment length, R dilation rate.

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py
from _common import (  # noqa: E402
    COMPILED_RUNS,
    RESULTS_DIR,
    cell,
    device_name,
    environment,
    format_n,
    free_memory,
    mixed_precision,
    pyplot,
    save_figure,
    slug,
    synchronize,
    write_json,
)

from mmlongnet import LongNetLM, MMLongNetConfig
from mmlongnet.attention.kernels import SELECTOR
from mmlongnet.data import (
    MEDIA_DTYPES,
    AssociativeRecall,
    AVDigitsConfig,
    AVDigitsDataset,
    LengthBuckets,
    RecallConfig,
    collate_samples,
)
from mmlongnet.data.avdigits import MIXES
from mmlongnet.data.recall import IGNORE_INDEX
from mmlongnet.data.text_files import split_text_files, stdlib_directory
from mmlongnet.modalities.text import ByteTokenizer
from mmlongnet.training import MultimodalClassifier, OptimizerConfig
from mmlongnet.training.data import draw_stage
from mmlongnet.training.graphed import GraphedSteps
from mmlongnet.training.module import CompiledModel

EXPERIMENTS = ("avdigits", "recall", "bytes")
MODEL_KINDS = ("dilated", "dense", "local")
BOUNDARY_EMBEDDINGS = {None: False, "per-modality": True, "shared": "shared"}
"""--boundary-embeddings -> MMLongNetConfig.boundary_embeddings."""
DENSE_SEGMENT = 1 << 24
"""A segment longer than any sequence here: one segment at rate 1 is full attention."""
TORCH_SOURCES = Path(torch.__file__).parent
"""The installed torch package's directory: Python sources present wherever this package runs."""
AUDIO_TOKENS_PER_DIGIT = 13
"""Audio tokens of one spoken digit with its gap at the audio encoder's default subsampling of 4
(25 tokens/s; measured mean 12.96 at K = 64); `--audio-subsampling` scales it."""


# ---------------------------------------------------------------------------------------------
# Metrics (pure functions of predictions; the tests check them on cases with known answers)


def grouped_accuracy(groups: Sequence, correct: Sequence[bool]) -> dict:
    """Accuracy per group and over all: {group: {"n", "correct", "accuracy"}, ..., "all": {...}}.

    Args:
        groups: one group key per prediction (e.g. the question type).
        correct: whether each prediction was right.
    """
    if len(groups) != len(correct):
        raise ValueError(f"groups and correct differ in length: {len(groups)} and {len(correct)}")
    table: dict = {}
    for key in [*sorted(set(groups), key=str), "all"]:
        hits = [bool(c) for g, c in zip(groups, correct, strict=True) if key == "all" or g == key]
        table[key] = {
            "n": len(hits),
            "correct": sum(hits),
            "accuracy": sum(hits) / len(hits) if hits else None,
        }
    return table


def bucket_label(low: int, high: int) -> str:
    """ "2K-8K" for [2048, 8192); plain numbers below 1K."""
    return f"{format_n(low) if low else 0}-{format_n(high)}"


def accuracy_by_distance(distances: torch.Tensor, correct: torch.Tensor, edges: Sequence[int]) -> list[dict]:
    """Accuracy of the queries whose distance falls in each bucket [edges[i], edges[i + 1]).

    Args:
        distances: (n,) long, distance of each query to its pair.
        correct: (n,) bool, whether its answer was right.
        edges: increasing bucket edges; distances outside [edges[0], edges[-1]) are left out.

    Returns:
        one {"bucket", "low", "high", "n", "correct", "accuracy"} per bucket (accuracy None when empty).
    """
    rows = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (distances >= low) & (distances < high)  # (n,)
        n, hits = int(inside.sum()), int((correct & inside).sum())
        rows.append({"bucket": bucket_label(low, high), "low": low, "high": high, "n": n, "correct": hits,
                     "accuracy": hits / n if n else None})  # fmt: skip
    return rows


def accuracy_by_residue(
    distances: torch.Tensor, correct: torch.Tensor, modulus: int, beyond: int
) -> list[dict | None]:
    """Accuracy of the queries farther than `beyond` by the residue of (distance - 1) mod `modulus`.

    A branch of rate r pairs a query only with key rows of its own residue mod r; a query at
    distance d from its pair's key is d - 1 from the pair's value, so without help from the token
    shift it reaches the value in one hop only when (d - 1) mod r == 0. Accuracy flat over the
    residues says the model reaches pairs at every residue; high at 0 only, that it does not.

    Args:
        distances: (n,) long, distance of each query to its pair.
        correct: (n,) bool, whether its answer was right.
        modulus: the largest dilation rate.
        beyond: only queries with distance >= beyond count (e.g. the first segment, reached at rate 1).

    Returns:
        per residue 0..modulus-1, {"n", "correct", "accuracy"}, or None when no query has it.
    """
    far = distances >= beyond  # (n,)
    residues = (distances[far] - 1) % modulus  # (m,)
    hits = correct[far]  # (m,)
    rows = []
    for residue in range(modulus):
        mine = residues == residue
        n, right = int(mine.sum()), int((hits & mine).sum())
        rows.append({"n": n, "correct": right, "accuracy": right / n} if n else None)
    return rows


def token_nats(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in nats of each target: logits (B, N, V), targets (B, N) -> (B, N) float32."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def bits_by_position(nats: torch.Tensor, edges: Sequence[int]) -> list[dict]:
    """Bits per byte in each bucket of positions [edges[i], edges[i + 1]) of the windows.

    Args:
        nats: (B, N) the loss in nats of every position of B windows (one token = one byte).
        edges: increasing position edges; the last may exceed N (the bucket is then cut at N).

    Returns:
        one {"bucket", "low", "high", "tokens", "bits_per_byte"} per bucket (None when empty).
    """
    rows = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        part = nats[:, low:high]  # (B, <= high - low)
        bits = float(part.double().mean()) / math.log(2) if part.numel() else None
        rows.append({"bucket": bucket_label(low, high), "low": low, "high": high, "tokens": part.numel(),
                     "bits_per_byte": bits})  # fmt: skip
    return rows


def window_gains(nats: torch.Tensor, edges: Sequence[int]) -> torch.Tensor:
    """Per window, bits per byte in the last position bucket minus in the first: (B, N) -> (B,)
    float64 (negative: the window's late bytes are predicted better than its early ones)."""
    first, last = nats[:, edges[0] : edges[1]], nats[:, edges[-2] : edges[-1]]
    return (last.double().mean(1) - first.double().mean(1)) / math.log(2)


def mean_and_error(values: Sequence[float]) -> dict:
    """{"n", "mean", "stderr"} of `values` (stderr: sample standard deviation / sqrt(n); None
    below two values)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean()) if x.size else None
    stderr = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else None
    return {"n": int(x.size), "mean": mean, "stderr": stderr}


def paired_gain_difference(gains: Sequence[float], baseline: Sequence[float]) -> dict:
    """How much more one model's late-minus-early gain is than a baseline's on the same windows:
    mean and standard error over the windows both were tested on (the first min(len) of each)."""
    n = min(len(gains), len(baseline))
    return mean_and_error(np.asarray(gains[:n]) - np.asarray(baseline[:n]))


# ---------------------------------------------------------------------------------------------
# Training for a fixed time


def lr_factor(
    step: int, progress: float, warmup_steps: int, min_lr_ratio: float, decay_share: float = 1.0
) -> float:
    """Learning-rate multiplier: linear warm-up over steps, then the peak until the last
    `decay_share` of the training time, then a cosine over that share down to `min_lr_ratio`
    (`decay_share` 1: a cosine over the whole time). `progress` in [0, 1] is the elapsed share."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decayed = min(1.0, max(0.0, (progress - (1.0 - decay_share)) / decay_share))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * decayed))


def curriculum_stage(
    progress: float, num_stages: int, curriculum: str, stage_shares: Sequence[float] | None = None
) -> int:
    """The index of the last active stage (lengths up to it are drawn) at `progress` in [0, 1].
    "grow" gives stage s the share `stage_shares[s] / sum(stage_shares)` of the time (default:
    equal shares); "mixed" has every stage active from the start."""
    if curriculum == "mixed":
        return num_stages - 1
    if stage_shares is None:
        return min(int(progress * num_stages), num_stages - 1)
    ends = np.cumsum(stage_shares) / sum(stage_shares)  # (num_stages,): where each stage ends
    return min(int(np.searchsorted(ends, progress, side="right")), num_stages - 1)


@dataclass
class TrainLog:
    """How one model trained: its steps, samples per length, and the loss along the way."""

    seconds: float = 0.0
    steps: int = 0
    samples: dict = field(default_factory=dict)
    """length (K digits or N tokens) -> training samples at it."""
    batch_wait: dict = field(default_factory=dict)
    """length -> seconds the loop waited for its batches (the loader's share of the time: near 0
    while the loaders keep ahead of the steps, most of `seconds` where they bound the training)."""
    curve: list = field(default_factory=list)
    """[seconds, step, loss] every `log_every` steps."""
    final_loss: float | None = None
    compile_seconds: float = 0.0
    """With --compile: seconds spent compiling every length before the training clock started."""
    stages: list = field(default_factory=list)
    """[seconds, step, length] when each stage of the curriculum began, `length` the one it added."""
    diverged: list | None = None
    """[seconds, step, length] of the first training-loss read that was not finite (NaN or inf):
    training stopped there, and the model is tested as it was. None: every read was finite."""

    def summary(self) -> str:
        """The steps and their seconds, the compiling before them when there was any, the time
        spent waiting for batches, and where training stopped on a non-finite loss."""
        compiled = f" (after {self.compile_seconds:.0f} s compiling)" if self.compile_seconds else ""
        stopped = ""
        if self.diverged is not None:
            seconds, step, length = self.diverged
            stopped = f"; STOPPED at step {step} ({seconds:.0f} s, length {length}): the loss was not finite"
        waited = f", {sum(self.batch_wait.values()):.0f} s waiting for batches"
        return f"{self.steps} steps in {self.seconds:.0f} s{compiled}{waited}{stopped}"


def compile_each_length(
    model: nn.Module, curriculum: Curriculum, loss_fn: Callable, device: torch.device, forward: Callable
) -> float:
    """Run every length's forward and backward `COMPILED_RUNS` times on its first batch (which
    training then takes as usual), discarding the gradients, so that no stage of the curriculum
    spends its time compiling. Returns the seconds spent. The runs promote every attention shape
    (`SELECTOR.promoting()`), so that the CUDA graphs recorded here take each call's fastest kernel."""
    started = time.perf_counter()
    with SELECTOR.promoting():
        for length in curriculum.lengths:
            for _ in range(COMPILED_RUNS):
                with mixed_precision(device):
                    loss = loss_fn(forward, curriculum.peek(length))
                loss.backward()
                model.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - started


def train_for(
    model: nn.Module,
    next_batch: Curriculum,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    seconds: float,
    args: argparse.Namespace,
    device: torch.device,
    forward: Callable | None = None,
    graphed: bool = False,
) -> TrainLog:
    """Train `model` for `seconds` of wall-clock time (or `--max-steps` steps, if fewer), with
    `--compile` the compiling of every length included (before the clock of the curriculum).

    Args:
        next_batch: (progress in [0, 1], rng) -> (length, batch): the curriculum picks the length.
        loss_fn: (forward, batch) -> scalar loss; with `graphed`, the loss of a step that has run
            its backward and clipping (`av_graphed_step`, `GraphedLMStep`).
        forward: what runs the model (default `model` itself; `CompiledModel(model)` with
            `--compile`).
    """
    forward = forward or model
    optimizer = OptimizerConfig(lr=args.lr, weight_decay=args.weight_decay).build(model, 1)["optimizer"]
    parameters = list(model.parameters())  # listed once: walking the ~330 modules costs ~2 ms a step
    rng = np.random.default_rng(args.seed)
    log = TrainLog()
    if args.compile:
        log.compile_seconds = compile_each_length(model, next_batch, loss_fn, device, forward)
        seconds = max(0.0, seconds - log.compile_seconds)
    start = time.perf_counter()
    model.train()
    while (elapsed := time.perf_counter() - start) < seconds and log.steps < (args.max_steps or math.inf):
        progress = max(elapsed / seconds, log.steps / args.max_steps if args.max_steps else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(
                log.steps, progress, args.warmup_steps, args.min_lr_ratio, args.decay_share
            )
        asked = time.perf_counter()
        length, batch = next_batch(progress, rng)
        log.batch_wait[length] = log.batch_wait.get(length, 0.0) + time.perf_counter() - asked
        while len(log.stages) <= next_batch.stage:  # the stages begun at this step
            log.stages.append([round(elapsed, 2), log.steps, next_batch.lengths[len(log.stages)]])
        with mixed_precision(device):
            loss = loss_fn(forward, batch)
        if not graphed:
            loss.backward()
            nn.utils.clip_grad_norm_(parameters, args.clip)
        optimizer.step()
        if not graphed:
            optimizer.zero_grad(set_to_none=True)
        log.steps += 1
        log.samples[length] = log.samples.get(length, 0) + batch_size_of(batch)
        if log.steps % args.log_every == 0 or log.steps == 1:
            log.final_loss = float(loss.detach())  # a host read every log_every steps only
            next_batch.record(length, log.final_loss)
            log.curve.append([round(time.perf_counter() - start, 2), log.steps, round(log.final_loss, 4)])
            if not math.isfinite(log.final_loss):  # the weights are lost: no use training on
                log.diverged = [round(time.perf_counter() - start, 2), log.steps, length]
                break
    log.seconds = time.perf_counter() - start
    log.batch_wait = {length: round(waited, 2) for length, waited in log.batch_wait.items()}
    return log


def tested(
    model: nn.Module,
    log: TrainLog,
    seconds: float,
    evaluate: Callable[..., dict],
    sizes: Sequence[int] | None = None,
) -> dict:
    """A trained model's results: its parameter count, its training log and its test metrics,
    `evaluate(deadline=...)`, or with `sizes` {size: `evaluate(size, deadline=...)`}, a test that
    stops by the deadline (`seconds` from now), with the time it took. With `sizes`, each size's
    deadline leaves the sizes after it an equal share of the time left, so a long size tested last
    is not starved by the short ones before it (and gets the time they did not use)."""
    started = time.perf_counter()
    deadline = started + seconds
    if sizes is None:
        metrics = evaluate(deadline=deadline)
    else:
        metrics = {}
        for index, size in enumerate(sizes):
            now = time.perf_counter()
            metrics[size] = evaluate(size, deadline=now + max(0.0, deadline - now) / (len(sizes) - index))
    return {
        "parameters": count_parameters(model), "train": dataclasses.asdict(log), "test": metrics,
        "eval_seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip


def batch_size_of(batch) -> int:
    if isinstance(batch, tuple):  # (Batch, questions)
        return len(batch[0])
    return len(batch["tokens"]) if isinstance(batch, dict) else len(batch)


def shares(args: argparse.Namespace, start: float, num_models: int) -> tuple[float, float]:
    """(training seconds, evaluation seconds) of each model: the budget left after start-up, split
    equally, so that every model trains for the same time."""
    left = max(0.0, args.time_budget - (time.perf_counter() - start)) / max(1, num_models)
    return left * (1 - args.eval_share), left * args.eval_share


def batch_for(tokens_per_sample: int, args: argparse.Namespace) -> int:
    """Samples per batch: about `--batch-tokens` tokens, at most `--batch-size`, at least 1."""
    return max(1, min(args.batch_size, args.batch_tokens // max(1, tokens_per_sample)))


# ---------------------------------------------------------------------------------------------
# 1. AV digits against K


def av_schedules(args: argparse.Namespace, kind: str) -> dict[str, dict]:
    """The stacks' schedules of a model kind: dilated (as given), dense, or local."""
    stacks = {
        "text_stack": (1, [64], [1]),
        "audio_stack": (args.modality_layers, args.modality_segments, args.modality_rates),
        "video_stack": (args.modality_layers, args.modality_segments, args.modality_rates),
        "fusion_stack": (args.fusion_layers, args.segments, args.rates),
    }
    out = {}
    for name, (layers, segments, rates) in stacks.items():
        if kind == "dense":
            segments, rates = [DENSE_SEGMENT], [1]
        elif kind == "local":
            segments, rates = [min(segments)], [1]
        out[name] = {"num_layers": layers, "segment_lengths": list(segments), "dilation_rates": list(rates)}
    return out


def av_model_config(args: argparse.Namespace, kind: str) -> MMLongNetConfig:
    E = args.d_model
    with_global = args.global_models is None or kind in args.global_models
    global_modalities = list(args.global_modalities or []) if with_global else []
    return MMLongNetConfig(
        d_model=E, nhead=args.nhead, dim_feedforward=args.ffn,
        positions=None if args.positions == "none" else args.positions, rotary_fraction=args.rotary_fraction,
        scalable_softmax=args.scalable_softmax,
        boundary_embeddings=BOUNDARY_EMBEDDINGS[args.boundary_embeddings],
        global_modalities=global_modalities, global_read=args.global_read and bool(global_modalities),
        text={"embed_dim": E},
        audio={"embed_dim": E, "n_mels": 40, "conv_channels": 32, "subsampling": args.audio_subsampling},
        video={"embed_dim": E, "image_size": 8, "patch_size": args.patch_size, "in_chans": 1},
        **av_schedules(args, kind),
    )  # fmt: skip


def av_collate(samples: list[dict], buckets: LengthBuckets | None, media_dtype: torch.dtype = torch.float32):
    """(Batch, (question type, views: "both", "audio" or "video") of each sample)."""
    batch = collate_samples(samples, buckets=buckets, media_dtype=media_dtype)
    return batch, [(sample["question"], sample["mix"]) for sample in samples]


def av_tokens_per_sample(K: int, args: argparse.Namespace) -> int:
    """About the fused tokens of a sample with both views: text, audio and video of K digits."""
    audio = math.ceil(AUDIO_TOKENS_PER_DIGIT * 4 / args.audio_subsampling)
    return 40 + K * (audio + (8 // args.patch_size) ** 2)


def weights_to_mix(names: Sequence[str], weights: Sequence[float] | None) -> dict[str, float] | None:
    """Relative weights, one per name -> probabilities by name (None stays None)."""
    if weights is None:
        return None
    return dict(zip(names, np.divide(weights, sum(weights)).tolist(), strict=True))


def av_loader(
    K: int, split: str, examples: int, args: argparse.Namespace, device: torch.device
) -> DataLoader:
    training = split == "train"  # testing: equal question shares, the default views
    view_mix = weights_to_mix(MIXES, args.train_view_weights if training else None)
    config = AVDigitsConfig(
        num_digits=K, questions=list(args.questions), seed=args.seed + K,
        question_mix=weights_to_mix(args.questions, args.train_question_weights if training else None),
        **({} if view_mix is None else {"modality_mix": view_mix}),
    )  # fmt: skip
    dataset = AVDigitsDataset(split, examples, config)
    if args.compile and split == "train":  # one shape per K (nearly always): one compiled graph
        buckets = dataset.one_shape_buckets()
    else:
        buckets = LengthBuckets() if device.type == "cuda" else None  # repeating shapes on a GPU
    workers = args.workers
    return DataLoader(
        dataset, batch_size=batch_for(av_tokens_per_sample(K, args), args), shuffle=False,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
        collate_fn=partial(av_collate, buckets=buckets, media_dtype=MEDIA_DTYPES[args.media_dtype]),
    )  # fmt: skip


ADVANCE_READS = 3
"""Training-loss reads in a row below `--advance-loss` that end a stage early."""


class Curriculum:
    """Batches from one endless loader per length; `next(progress, rng)` draws a length among the
    stages active at `progress` (see `curriculum_stage`; uniformly, or the newest in a share
    `newest_share` of the batches, `draw_stage`) and returns (length, batch).

    `stage_shares`: the time shares of the "grow" stages (see `curriculum_stage`). With
    `advance_loss`, a "grow" stage also ends early: once `record` has seen the loss at the
    stage's newest length below `advance_loss` `ADVANCE_READS` times in a row, the next length
    joins (time still ends a stage at the latest)."""

    def __init__(
        self,
        lengths: Sequence[int],
        make_loader: Callable[[int], DataLoader],
        curriculum: str,
        advance_loss: float | None = None,
        newest_share: float | None = None,
        stage_shares: Sequence[float] | None = None,
    ) -> None:
        self.lengths, self.make_loader, self.curriculum = list(lengths), make_loader, curriculum
        self.advance_loss, self.newest_share = advance_loss, newest_share
        # a model trained on fewer lengths (dense) keeps the first shares
        self.stage_shares = None if stage_shares is None else list(stage_shares)[: len(self.lengths)]
        self.iterators: dict[int, Iterator] = {}
        self.peeked: dict[int, object] = {}  # length -> its next batch, already drawn
        self.stage = 0  # the last active stage at the latest draw
        self.learned = 0  # the stage reached by the loss (0: none ended early)
        self.below = 0  # reads in a row below advance_loss at the current stage's newest length

    def batch(self, length: int):
        """The next batch of one length."""
        if length in self.peeked:
            return self.peeked.pop(length)
        if length not in self.iterators:
            self.iterators[length] = iter(self.make_loader(length))
        return next(self.iterators[length])

    def peek(self, length: int):
        """The batch `batch(length)` will return next (the stream of batches stays the same)."""
        if length not in self.peeked:
            self.peeked[length] = self.batch(length)
        return self.peeked[length]

    def __call__(self, progress: float, rng: np.random.Generator):
        stage = curriculum_stage(progress, len(self.lengths), self.curriculum, self.stage_shares)
        stage = max(stage, self.learned)
        if stage != self.stage:
            self.stage, self.below = stage, 0
        length = self.lengths[draw_stage(rng, stage + 1, self.newest_share)]
        return length, self.batch(length)

    def record(self, length: int, loss: float) -> None:
        """A training loss read at `length`: may end the current stage (see the class)."""
        if self.advance_loss is None or length != self.lengths[self.stage]:
            return
        self.below = self.below + 1 if loss < self.advance_loss else 0
        if self.below >= ADVANCE_READS and self.stage + 1 < len(self.lengths):
            self.learned = self.stage + 1


def av_loss(module: MultimodalClassifier, batch, device: torch.device) -> torch.Tensor:
    data, _ = batch
    data = module.transfer_batch_to_device(data, device, 0)
    logits = module(data)  # (B, 10)
    return F.cross_entropy(logits.float(), data.labels.to(device, non_blocking=True))


def av_graphed_step(module: MultimodalClassifier, batch, device: torch.device, clip: float) -> torch.Tensor:
    """`--graphed`: the module's graphed step (forward, the same loss, backward, clipping by norm);
    returns the loss, detached."""
    data, _ = batch
    loss, _ = module.graphed_step(module.transfer_batch_to_device(data, device, 0), (clip, "norm"))
    return loss


@torch.no_grad()
def av_evaluate(module, K, args, device, deadline: float) -> dict:
    """Test accuracy at K digits per question type, and per question type of the samples of each
    view ("both", "audio", "video"; `by_view`), stops early at `deadline`."""
    module.eval()
    asked, correct, tokens = [], [], []
    for data, kinds in av_loader(K, "test", args.eval_examples, args, device):
        if asked and time.perf_counter() > deadline:  # at least one batch per K
            break
        data = module.transfer_batch_to_device(data, device, 0)
        with mixed_precision(device):
            predicted = module(data).argmax(-1).cpu()  # (B,)
        asked += kinds
        correct += (predicted == data.labels).tolist()
        tokens.append(module.last_batch_tokens / len(kinds))
    module.train()
    questions, views = [question for question, _ in asked], [view for _, view in asked]
    by_view = {}
    for view in sorted(set(views)):
        mine = [i for i, v in enumerate(views) if v == view]
        by_view[view] = grouped_accuracy([questions[i] for i in mine], [correct[i] for i in mine])
    return {
        "accuracy": grouped_accuracy(questions, correct), "by_view": by_view,
        "fused_tokens_per_sample": float(np.mean(tokens)) if tokens else None,
    }  # fmt: skip


def run_avdigits(args: argparse.Namespace, device: torch.device, start: float) -> dict:
    results = {}
    train_s, eval_s = shares(args, start, len(args.models))
    for kind in args.models:
        digits = [K for K in args.digits if kind != "dense" or K <= args.dense_max_digits]
        tested_digits = [K for K in av_test_digits(args) if kind != "dense" or K <= args.dense_max_digits]
        torch.manual_seed(args.seed)
        module = MultimodalClassifier(
            av_model_config(args, kind), num_classes=10, pooling=args.pooling, compile=args.compile,
            graphed=args.graphed,
        ).to(device)  # fmt: skip
        curriculum = Curriculum(
            digits, lambda K: av_loader(K, "train", 10**7, args, device), args.curriculum, args.advance_loss,
            args.newest_share, args.stage_shares,
        )  # fmt: skip
        loss_fn = (
            partial(av_graphed_step, device=device, clip=args.clip)
            if args.graphed
            else partial(av_loss, device=device)
        )
        log = train_for(module, curriculum, loss_fn, train_s, args, device, graphed=args.graphed)
        module.compiled = None  # tested eagerly: compiling the test shapes would cost more than it saves
        results[kind] = tested(
            module, log, eval_s, partial(av_evaluate, module, args=args, device=device), tested_digits
        )
        metrics = results[kind]["test"]
        print(f"[avdigits] {kind}: {log.summary()}, " + ", ".join(
            f"K={K} {m['accuracy']['all']['accuracy']}" for K, m in metrics.items()), flush=True)  # fmt: skip
        del module, curriculum
        free_memory(device)
    return results


def av_test_digits(args: argparse.Namespace) -> list[int]:
    """The K tested: those trained (`--digits`) and those only tested (`--test-digits`), ascending."""
    return sorted(set(args.digits) | set(args.test_digits or ()))


def avdigits_table(results: dict, args: argparse.Namespace) -> str:
    """One row per K and model: the training samples at that K, the test accuracy overall and per
    question type; K only tested (`--test-digits`) are marked "(not trained)". Then one row per K,
    model and views (both, audio or video alone): the test samples and their accuracies."""
    questions = list(args.questions)
    lines = [
        "| K | fused tokens | model | steps | samples | all | " + " | ".join(questions) + " |",
        "|---" * (6 + len(questions)) + "|",
    ]
    for K in av_test_digits(args):
        label = str(K) if K in args.digits else f"{K} (not trained)"
        for kind, result in results.items():
            metrics = result["test"].get(K)
            if metrics is None:
                continue
            acc = metrics["accuracy"]
            tokens = metrics["fused_tokens_per_sample"]
            cells = [cell((acc.get(q) or {}).get("accuracy"), ".3f") for q in ["all", *questions]]
            samples = result["train"]["samples"].get(K, 0)
            lines.append(
                f"| {label} | {cell(tokens, ',.0f')} | {kind} | {result['train']['steps']:,} | {samples:,} | "
                + " | ".join(cells)
                + " |"
            )
    lines += ["", "| K | model | views | samples | all | " + " | ".join(questions) + " |",
              "|---" * (5 + len(questions)) + "|"]  # fmt: skip
    for K in av_test_digits(args):
        for kind, result in results.items():
            for view, acc in (result["test"].get(K) or {}).get("by_view", {}).items():
                cells = [cell((acc.get(q) or {}).get("accuracy"), ".3f") for q in ["all", *questions]]
                lines.append(f"| {K} | {kind} | {view} | {acc['all']['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 2. Associative recall against distance


def recall_config(args: argparse.Namespace, length: int, seed: int) -> RecallConfig:
    return RecallConfig(
        length=length, num_pairs=args.pairs, num_queries=args.queries, num_keys=args.num_keys,
        num_values=args.num_values, num_fillers=args.num_fillers, seed=seed,
    )  # fmt: skip


TIED = "tied"
"""`--embedding-std tied`: the LM's default embedding, std d_model^-0.5, shared with the output."""


def embedding_std_option(text: str) -> float | str:
    """`--embedding-std`: a positive std, or "tied"."""
    if text == TIED:
        return TIED
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive std or '{TIED}', got {text!r}")
    return value


def lm_for(args: argparse.Namespace, kind: str, vocab: int) -> LongNetLM:
    """The `LongNetLM` of a model kind: dilated (`--segments`/`--rates`), local (one
    `--local-window` segment at rate 1) or dense (full causal attention)."""
    segments, rates = list(args.segments), list(args.rates)
    if kind == "local":
        segments, rates = [args.local_window], [1]
    return LongNetLM(
        num_tokens=vocab, d_model=args.d_model, nhead=args.nhead, num_layers=args.layers,
        dim_feedforward=args.ffn, segment_lengths=segments, dilation_rates=rates,
        attention="dense" if kind == "dense" else "dilated", tie_embeddings=args.embedding_std == TIED,
        embedding_std=None if args.embedding_std == TIED else args.embedding_std,
        token_shift=args.token_shift, token_shift_window=args.token_shift_window if args.token_shift else 0.0,
        positions=None if args.positions == "none" else args.positions, rotary_fraction=args.rotary_fraction,
        scalable_softmax=args.scalable_softmax,
    )  # fmt: skip


def recall_loader(args: argparse.Namespace, length: int, examples: int, seed: int) -> DataLoader:
    dataset = AssociativeRecall(recall_config(args, length, seed), examples)
    return DataLoader(dataset, batch_size=batch_for(length, args), num_workers=args.workers,
                      persistent_workers=args.workers > 0, pin_memory=args.device == "cuda")  # fmt: skip


def recall_loss(forward: Callable, batch: dict, device: torch.device) -> torch.Tensor:
    """`forward`: the `LongNetLM` or its `CompiledModel`."""
    tokens = batch["tokens"].to(device, non_blocking=True)  # (B, N)
    targets = batch["targets"].to(device, non_blocking=True)  # (B, N)
    return F.cross_entropy(forward(tokens).float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX)


class GraphedLMStep:
    """`--graphed` for the LMs: a training step (forward, `loss_fn`, backward, clipping by norm)
    recorded as one CUDA graph per batch shape (`GraphedSteps`) after two eager steps of it, and
    replayed; called as the loss functions are, returns the step's loss (on a CPU every step runs
    eagerly through the same path)."""

    def __init__(self, model: nn.Module, loss_fn: Callable, clip: float, device: torch.device):
        self.steps, self.loss_fn, self.clip, self.device = GraphedSteps(model), loss_fn, clip, device

    def __call__(self, forward: Callable, batch) -> torch.Tensor:
        if isinstance(batch, dict):  # recall: the tokens and their targets
            names = ("tokens", "targets")
            tensors = [batch[name].to(self.device, non_blocking=True) for name in names]
        else:  # bytes: the windows
            names, tensors = None, [batch.to(self.device, non_blocking=True)]
        signature = (
            tuple((tuple(t.shape), t.dtype) for t in tensors),
            torch.is_autocast_enabled(self.device.type),
        )

        def step(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            loss = self.loss_fn(forward, dict(zip(names, tensors, strict=True)) if names else tensors[0])
            loss.backward()
            nn.utils.clip_grad_norm_(self.steps.parameters, self.clip, foreach=True)
            return [loss]

        return self.steps(signature, tensors, step)[0]


def lm_loss_fn(model: nn.Module, loss: Callable, args: argparse.Namespace, device: torch.device):
    """The LMs' loss function: `loss` on the device, or with `--graphed` a `GraphedLMStep` of it."""
    loss_fn = partial(loss, device=device)
    return GraphedLMStep(model, loss_fn, args.clip, device) if args.graphed else loss_fn


@torch.no_grad()
def recall_evaluate(model, length, args, device, deadline: float) -> dict:
    """Accuracy at `length` tokens over the whole test set and per distance bucket."""
    model.eval()
    distances, correct = [], []
    for batch in recall_loader(args, length, args.eval_sequences, seed=args.seed + 10**6):
        if distances and time.perf_counter() > deadline:  # at least one batch per length
            break
        with mixed_precision(device):
            predicted = model(batch["tokens"].to(device)).argmax(-1).cpu()  # (B, N)
        asked = batch["targets"] != IGNORE_INDEX  # (B, N)
        distances.append(batch["distances"][asked])
        correct.append((predicted == batch["targets"])[asked])
    model.train()
    distances = torch.cat(distances) if distances else torch.zeros(0, dtype=torch.long)
    correct = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    edges = [edge for edge in args.distance_edges if edge < length] + [length]
    return {
        "queries": int(correct.numel()),
        "accuracy": float(correct.float().mean()) if correct.numel() else None,
        "by_distance": accuracy_by_distance(distances, correct, edges),
        "by_residue": accuracy_by_residue(distances, correct, max(args.rates), args.segments[0]),
    }


def run_recall(args: argparse.Namespace, device: torch.device, start: float) -> dict:
    vocab = recall_config(args, max(args.lengths), 0).vocab_size
    results = {}
    train_s, eval_s = shares(args, start, len(args.models))
    for kind in args.models:
        lengths = [n for n in args.lengths if kind != "dense" or n <= args.dense_max_length]
        torch.manual_seed(args.seed)
        model = lm_for(args, kind, vocab).to(device)
        curriculum = Curriculum(
            lengths, lambda n: recall_loader(args, n, 10**9, seed=args.seed + n), args.curriculum,
            args.advance_loss, args.newest_share, args.stage_shares,
        )  # fmt: skip
        forward = CompiledModel(model) if args.compile else model  # one graph per length
        loss_fn = lm_loss_fn(model, recall_loss, args, device)
        log = train_for(model, curriculum, loss_fn, train_s, args, device, forward, graphed=args.graphed)
        evaluate = partial(recall_evaluate, model, args=args, device=device)
        results[kind] = tested(model, log, eval_s, evaluate, lengths)
        metrics = results[kind]["test"]
        print(f"[recall] {kind}: {log.summary()}, " + ", ".join(
            f"N={n} {m['accuracy']}" for n, m in metrics.items()), flush=True)  # fmt: skip
        residues = metrics[max(lengths)]["by_residue"]
        print(f"[recall] {kind}: at N={max(lengths)}, pairs {args.segments[0]}+ back by (distance - 1) mod "
              f"{max(args.rates)}: " + " ".join(cell(row and row["accuracy"], ".2f") for row in residues),
              flush=True)  # fmt: skip
        del model, forward, curriculum
        free_memory(device)
    return results


def recall_table(results: dict, args: argparse.Namespace) -> str:
    longest = max(args.lengths)
    edges = [edge for edge in args.distance_edges if edge < longest] + [longest]
    labels = [bucket_label(low, high) for low, high in zip(edges[:-1], edges[1:], strict=True)]
    lines = ["| N | model | steps | all | " + " | ".join(f"d {label}" for label in labels) + " |",
             "|---" * (4 + len(labels)) + "|"]  # fmt: skip
    for n in args.lengths:
        for kind, result in results.items():
            metrics = result["test"].get(n)
            if metrics is None:
                continue
            by_low = {row["low"]: row["accuracy"] for row in metrics["by_distance"]}
            cells = [cell(by_low.get(low), ".3f") if low < n else "" for low in edges[:-1]]
            accuracy = cell(metrics["accuracy"], ".3f")
            lines.append(
                f"| {n:,} | {kind} | {result['train']['steps']} | {accuracy} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 3. Bytes of real text against position


class FileWindows(torch.utils.data.Dataset):
    """Windows of N + 1 byte ids, each inside one file (files of at most N + 1 bytes are left out).

    Window i draws a file (with probability proportional to its number of windows) and a start
    from default_rng([seed, i]). `__getitem__(i) -> (N + 1,) long` (ByteTokenizer ids: byte + 3).
    """

    def __init__(self, files: Sequence[Path], window: int, num_windows: int, seed: int) -> None:
        offset = ByteTokenizer().offset
        self.texts = [
            np.frombuffer(p.read_bytes(), dtype=np.uint8) for p in files if p.stat().st_size > window + 1
        ]
        if not self.texts:
            raise ValueError(f"no file longer than the window of {window + 1} bytes")
        self.offset, self.window, self.num_windows, self.seed = offset, window, num_windows, seed
        starts = np.array([len(t) - window - 1 for t in self.texts], dtype=np.float64)  # (files,)
        self.cdf = np.cumsum(starts) / starts.sum()
        self.total_bytes = int(sum(len(t) for t in self.texts))

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, index])
        text = self.texts[
            min(int(np.searchsorted(self.cdf, rng.random(), side="right")), len(self.texts) - 1)
        ]
        start = int(rng.integers(0, len(text) - self.window))
        return torch.from_numpy(
            text[start : start + self.window + 1].astype(np.int64) + self.offset
        )  # (N + 1,)


def bytes_corpus(args: argparse.Namespace) -> dict[str, list[Path]]:
    """split -> files of every `--root` directory (default: the standard library's and torch's
    Python sources, there wherever this package runs), each file once."""
    roots = [Path(root) for root in args.root] if args.root else [stdlib_directory(), TORCH_SOURCES]
    splits, seen = {}, set()
    for root in roots:
        for split, files in split_text_files(root, args.pattern).items():
            fresh = [path for path in files if path.resolve() not in seen]
            seen.update(path.resolve() for path in fresh)
            splits.setdefault(split, []).extend(fresh)
    return splits


def bytes_loader(windows: FileWindows, args: argparse.Namespace) -> DataLoader:
    return DataLoader(windows, batch_size=batch_for(args.window, args), num_workers=args.workers,
                      persistent_workers=args.workers > 0, pin_memory=args.device == "cuda")  # fmt: skip


def bytes_loss(forward: Callable, windows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`forward`: the `LongNetLM` or its `CompiledModel`."""
    windows = windows.to(device, non_blocking=True)  # (B, N + 1)
    return F.cross_entropy(forward(windows[:, :-1]).float().transpose(1, 2), windows[:, 1:])


@torch.no_grad()
def bytes_evaluate(model, windows: FileWindows, args, device, deadline: float) -> dict:
    model.eval()
    nats = []
    for batch in DataLoader(windows, batch_size=batch_for(args.window, args)):
        if nats and time.perf_counter() > deadline:  # at least one batch
            break
        batch = batch.to(device)
        with mixed_precision(device):
            logits = model(batch[:, :-1])  # (B, N, V)
        nats.append(token_nats(logits, batch[:, 1:]).cpu())  # (B, N)
    model.train()
    nats = torch.cat(nats) if nats else torch.zeros(0, args.window)
    gains = window_gains(nats, args.position_edges).tolist()
    return {
        "windows": len(nats),
        "bits_per_byte": float(nats.double().mean()) / math.log(2) if nats.numel() else None,
        "by_position": bits_by_position(nats, args.position_edges),
        "gain": mean_and_error(gains),
        "window_gains": gains,
    }


def run_bytes(args: argparse.Namespace, device: torch.device, start: float) -> dict:
    files = bytes_corpus(args)
    train = FileWindows(files["train"], args.window, 10**9, args.seed)
    test = FileWindows(files["test"] + files["val"], args.window, args.eval_windows, args.seed + 1)
    results = {"corpus": {"train_files": len(train.texts), "train_bytes": train.total_bytes,
                          "test_files": len(test.texts), "test_bytes": test.total_bytes}}  # fmt: skip
    models = {}
    train_s, eval_s = shares(args, start, len(args.models))
    for kind in args.models:
        torch.manual_seed(args.seed)
        model = lm_for(args, kind, ByteTokenizer().vocab_size).to(device)
        windows = Curriculum([args.window], lambda n: bytes_loader(train, args), "mixed")
        forward = CompiledModel(model) if args.compile else model  # one graph: every window is N bytes
        loss_fn = lm_loss_fn(model, bytes_loss, args, device)
        log = train_for(model, windows, loss_fn, train_s, args, device, forward, graphed=args.graphed)
        models[kind] = tested(model, log, eval_s, partial(bytes_evaluate, model, test, args, device))
        metrics = models[kind]["test"]
        buckets = (f"{row['bucket']} {cell(row['bits_per_byte'], '.3f')}" for row in metrics["by_position"])
        print(f"[bytes] {kind}: {log.summary()}, " + ", ".join(buckets), flush=True)
        del model, forward, windows
        free_memory(device)
    if {"dilated", "local"} <= set(models):  # the same test windows, in the same order
        results["dilated_gain_minus_local"] = paired_gain_difference(
            models["dilated"]["test"]["window_gains"], models["local"]["test"]["window_gains"]
        )
    return results | {"models": models}


def bytes_table(results: dict, args: argparse.Namespace) -> str:
    edges = list(args.position_edges)
    labels = [bucket_label(low, high) for low, high in zip(edges[:-1], edges[1:], strict=True)]
    lines = ["| model | steps | windows | all | " + " | ".join(f"bits/byte {label}" for label in labels)
             + " | last - first bucket (± s.e.) |", "|---" * (5 + len(labels)) + "|"]  # fmt: skip
    for kind, result in results["models"].items():
        bits = [row["bits_per_byte"] for row in result["test"]["by_position"]]
        cells = [str(result["train"]["steps"]), str(result["test"]["windows"])]
        cells += [cell(b, ".3f") for b in [result["test"]["bits_per_byte"], *bits]]
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {plus_minus(result['test']['gain'])} |")
    if "dilated_gain_minus_local" in results:
        difference = results["dilated_gain_minus_local"]
        lines.append(f"\ndilated's last - first bucket minus local's, paired over {difference['n']} test "
                     f"windows: {plus_minus(difference)} bits/byte (below 0: the dilated model gains more "
                     "from long context)")  # fmt: skip
    return "\n".join(lines)


def plus_minus(estimate: dict) -> str:
    """Formats a `mean_and_error` dict as "-0.042 ± 0.004" (the standard error; "-" where unknown)."""
    error = f" ± {estimate['stderr']:.3f}" if estimate["stderr"] is not None else ""
    return cell(estimate["mean"], ".3f") + error


# ---------------------------------------------------------------------------------------------
# Plots, files, the command line


def plot(experiment: str, results: dict, args: argparse.Namespace, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    models = results["models"] if experiment == "bytes" else results
    for kind, result in models.items():
        curve = np.array(result["train"]["curve"]).reshape(-1, 3)
        right.plot(curve[:, 0], curve[:, 2], label=kind)
        if experiment == "avdigits":
            Ks = sorted(result["test"], key=int)  # int keys, or str ones when replotted from the JSON
            accuracy = [result["test"][K]["accuracy"]["all"]["accuracy"] or 0 for K in Ks]
            left.plot([int(K) for K in Ks], accuracy, "o-", label=kind)
        elif experiment == "recall":
            for n, metrics in result["test"].items():
                rows = [row for row in metrics["by_distance"] if row["n"]]
                left.plot([math.sqrt(max(1, row["low"]) * row["high"]) for row in rows],
                          [row["accuracy"] for row in rows], "o-", label=f"{kind}, N={int(n):,}")  # fmt: skip
        else:
            rows = result["test"]["by_position"]
            left.plot([math.sqrt(max(1, row["low"]) * row["high"]) for row in rows],
                      [row["bits_per_byte"] or math.nan for row in rows], "o-", label=kind)  # fmt: skip
    chance = {"avdigits": 0.1, "recall": 1 / args.num_values if experiment == "recall" else None}.get(
        experiment
    )
    if chance:
        left.axhline(chance, color="grey", linestyle=":", label="chance")
    xlabel = {"avdigits": "K digits per example", "recall": "distance query -> pair (tokens)",
              "bytes": "position in the window (bytes)"}[experiment]  # fmt: skip
    left.set(
        xscale="log", xlabel=xlabel, ylabel="bits per byte" if experiment == "bytes" else "test accuracy"
    )
    right.set(xlabel="training seconds", ylabel="training loss", title="training (same time per model)")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    left.set_title(f"quality: {experiment}")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def run_metadata(args: argparse.Namespace, device: torch.device) -> dict:
    options = {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()}
    return environment(device) | {"experiment": args.experiment, "options": options}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Per experiment: its defaults (the one source of truth), then --smoke's toy sizes.
DEFAULTS = {
    "avdigits": dict(
        time_budget=540.0, decay_share=1.0,
        models=["dilated", "dense", "local"], digits=[4, 16, 64, 256, 1024], test_digits=None,
        questions=["first", "last", "count"], train_question_weights=None, train_view_weights=None,
        dense_max_digits=1024,
        curriculum="grow", advance_loss=0.3, newest_share=None, stage_shares=None, pooling="text",
        compile=False, graphed=False, positions="rope", d_model=256, nhead=8, ffn=1024, patch_size=8,
        fusion_layers=4, modality_layers=1, audio_subsampling=8, rotary_fraction=0.5,
        segments=[256, 1024, 4096, 16384], rates=[1, 2, 4, 8],
        modality_segments=[256, 1024, 4096], modality_rates=[1, 2, 4],
        lr=3e-4, warmup_steps=300, batch_size=64, batch_tokens=65536, eval_examples=512,
        media_dtype="float16",
    ),
    "recall": dict(
        time_budget=540.0, decay_share=1.0,
        models=["dilated", "local", "dense"], lengths=[4096, 16384, 65536], dense_max_length=16384,
        curriculum="grow", advance_loss=None, newest_share=None, stage_shares=None, compile=False,
        graphed=False, pairs=64, queries=32, num_keys=512, num_values=64, num_fillers=64,
        d_model=256, nhead=8, ffn=1024, layers=4, local_window=2048,
        segments=[2048, 8192, 32768, 65536], rates=[1, 2, 4, 8],
        distance_edges=[0, 512, 2048, 8192, 32768], embedding_std=4.0, token_shift=9, token_shift_window=0.5,
        positions="none", rotary_fraction=1.0,
        lr=1e-3, warmup_steps=200, batch_size=16, batch_tokens=65536, eval_sequences=64,
    ),
    "bytes": dict(
        time_budget=540.0, decay_share=1.0,
        models=["dilated", "local"], window=32768, root=None, pattern="*.py", compile=False, graphed=False,
        d_model=256, nhead=8, ffn=1024, layers=4, local_window=2048,
        segments=[2048, 4096, 8192, 16384, 32768], rates=[1, 2, 4, 8, 16],
        position_edges=[0, 2048, 8192, 32768], embedding_std=TIED, token_shift=0, token_shift_window=0.0,
        positions="rope", rotary_fraction=1.0,
        lr=1e-3, warmup_steps=200, batch_size=16, batch_tokens=65536, eval_windows=256,
    ),
}  # fmt: skip
SMOKE = {
    "avdigits": dict(
        digits=[2, 4], dense_max_digits=2, d_model=16, nhead=2, ffn=32, fusion_layers=1, segments=[8, 16],
        rates=[1, 2], modality_segments=[8, 16], modality_rates=[1, 2], batch_size=4, batch_tokens=10**6,
        eval_examples=8, warmup_steps=2, time_budget=4.0,
    ),
    "recall": dict(
        lengths=[64, 128], dense_max_length=64, pairs=8, queries=4, num_keys=16, num_values=8, num_fillers=4,
        d_model=16, nhead=2, ffn=32, layers=2, local_window=16, segments=[16, 64, 128], rates=[1, 2, 4],
        distance_edges=[0, 16, 64], batch_size=4, batch_tokens=256, eval_sequences=4, warmup_steps=2,
        time_budget=3.0,
    ),
    "bytes": dict(
        window=256, d_model=16, nhead=2, ffn=32, layers=2, local_window=32, segments=[32, 64, 256],
        rates=[1, 2, 4], position_edges=[0, 32, 128, 256], batch_size=2, batch_tokens=512, eval_windows=4,
        warmup_steps=2, time_budget=3.0,
    ),
}  # fmt: skip
RUNNERS = {"avdigits": (run_avdigits, avdigits_table), "recall": (run_recall, recall_table),
           "bytes": (run_bytes, bytes_table)}  # fmt: skip


class _RecipeParser(argparse.ArgumentParser):
    """Reads `@FILE` as the arguments written in FILE: shell words, any number a line, `#` comments."""

    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        return shlex.split(arg_line, comments=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _RecipeParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        fromfile_prefix_chars="@",
        epilog="@FILE reads arguments from FILE (shell words, # comments), e.g. a recipe in configs/; "
        "options after it override the file's.",
    )
    parser.add_argument("experiment", choices=EXPERIMENTS)
    common = parser.add_argument_group("every experiment")
    common.add_argument("--time-budget", type=float, help="seconds for the whole run (default 540)")
    common.add_argument(
        "--eval-share", type=float, default=0.15, help="share of each model's time kept for its evaluation"
    )
    common.add_argument(
        "--models",
        nargs="+",
        choices=list(MODEL_KINDS),
        help="models compared (default per experiment)",
    )
    common.add_argument("--lr", type=float, help="peak learning rate (default 3e-4 for avdigits, else 1e-3)")
    common.add_argument(
        "--warmup-steps", type=int, help="steps of linear warm-up (default 300 for avdigits, else 200)"
    )
    common.add_argument(
        "--min-lr-ratio", type=float, default=0.1, help="the cosine over the training time ends at lr * this"
    )
    common.add_argument(
        "--decay-share",
        type=float,
        help="the learning rate stays at its peak after the warm-up until this last share of the training "
        "time, over which it decays on a cosine, in (0, 1] (default 1: a cosine over the whole time)",
    )
    common.add_argument("--weight-decay", type=float, default=0.01)
    common.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm")
    common.add_argument(
        "--batch-size", type=int, help="samples per batch at most (default 64 avdigits, 16 recall and bytes)"
    )
    common.add_argument(
        "--batch-tokens",
        type=int,
        help="tokens per batch: batch = min(batch-size, this / tokens per sample) (default 65536)",
    )
    common.add_argument(
        "--curriculum",
        choices=["grow", "mixed"],
        help="grow: one stage per length, each adding the next; mixed: all lengths from the start",
    )
    common.add_argument(
        "--advance-loss",
        type=float,
        help=f"with --curriculum grow, a stage also ends once the training loss at its newest length "
        f"reads below this {ADVANCE_READS} times in a row (every --log-every steps), so the longer "
        "lengths get the time a learned one no longer needs (default 0.3 for avdigits; recall: stages by "
        "time only)",
    )
    common.add_argument(
        "--newest-share",
        type=float,
        help="while two or more lengths are drawn, the share of batches at the newest (the others "
        "uniformly among the earlier), in (0, 1]; default: every length alike",
    )
    common.add_argument(
        "--stage-shares",
        type=float,
        nargs="+",
        help="with --curriculum grow, the time share of each stage, one weight > 0 per length (normalized; "
        "default: equal shares); a dense model trained on fewer lengths keeps the first",
    )
    common.add_argument("--d-model", type=int, help="width (default 256)")
    common.add_argument("--nhead", type=int, help="attention heads (default 8)")
    common.add_argument("--ffn", type=int, help="FFN hidden size (default 1024)")
    common.add_argument(
        "--segments",
        type=int,
        nargs="+",
        help="segment lengths of the dilated model (the fusion stack's for avdigits)",
    )
    common.add_argument("--rates", type=int, nargs="+", help="dilation rates of the dilated model")
    common.add_argument(
        "--embedding-std",
        type=embedding_std_option,
        help="recall and bytes: the LM's token embedding at this initial std, untied from the output, "
        "or 'tied' (std d_model^-0.5, shared with the output); default 4 for recall, tied for bytes "
        "(see LongNetLMConfig.embedding_std)",
    )
    common.add_argument(
        "--token-shift",
        type=int,
        help="recall and bytes: the LMs' causal token shift of this width, 0 for none "
        "(LongNetLMConfig.token_shift; default 9 for recall, the default rates' largest + 1; 0 for bytes)",
    )
    common.add_argument(
        "--token-shift-window",
        type=float,
        help="recall and bytes: the share of the token shift's channels fixed to the sum of the last W "
        "tokens (LongNetLMConfig.token_shift_window; default 0.5 for recall, 0 for bytes)",
    )
    common.add_argument(
        "--positions",
        choices=["rope", "xpos", "none"],
        help="positions in attention (MMLongNetConfig.positions, LongNetLMConfig.positions; 'none': no "
        "position encoding, in the LMs the causal mask alone orders the tokens; default none for recall, "
        "rope for avdigits and bytes)",
    )
    common.add_argument(
        "--rotary-fraction",
        type=float,
        help="with --positions rope: the share of each head's channels rotated, the rest position-free "
        "(MMLongNetConfig.rotary_fraction, LongNetLMConfig.rotary_fraction; default 0.5 for avdigits, "
        "1.0 (all) for recall and bytes)",
    )
    common.add_argument(
        "--scalable-softmax",
        type=int,
        metavar="N0",
        help="Scalable-Softmax in every self-attention: each head's scores times a learned s * log(n), "
        "n the keys of the query's context, s starting at 1 / log(N0) (MMLongNetConfig.scalable_softmax, "
        "LongNetLMConfig.scalable_softmax; default off)",
    )
    common.add_argument(
        "--workers",
        type=int,
        help="data-loader workers (default on a GPU: the cores less 2, at most 8; 0 on the CPU)",
    )
    common.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop each model's training after this many steps too (default: time only)",
    )
    common.add_argument(
        "--log-every", type=int, default=25, help="training loss read back every this many steps"
    )
    common.add_argument(
        "--compile", action="store_true", default=None,
        help="train compiled (CUDA graphs on a GPU), one graph per input shape: avdigits pads audio and "
        "video to one shape per K, recall has one per length, bytes one; each compile costs ~1-2 "
        "minutes of the model's training time on a GPU; testing runs eagerly",
    )  # fmt: skip
    common.add_argument(
        "--graphed", action="store_true", default=None,
        help="train with graphed steps: each training step (forward, loss, backward, clipping) one CUDA "
        "graph per input shape, after two eager steps of it, no compiling (avdigits: the classifier's; "
        "recall and bytes: `GraphedSteps` around the LM's step); not with --compile",
    )  # fmt: skip
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    common.add_argument("--out", type=Path, default=RESULTS_DIR)
    common.add_argument(
        "--tag", default=None, help="file tag (default: the device's name; smoke with --smoke)"
    )
    common.add_argument("--smoke", action="store_true", help="toy sizes that run on a CPU in seconds")
    av = parser.add_argument_group("avdigits")
    av.add_argument("--digits", type=int, nargs="+", help="K digits per example (default 4 16 64 256 1024)")
    av.add_argument(
        "--test-digits",
        type=int,
        nargs="+",
        help="K also tested, not trained: how far a model trained on --digits carries over (default none)",
    )
    av.add_argument(
        "--questions",
        nargs="+",
        choices=["first", "last", "count", "after", "most"],
        help="question types (default first last count)",
    )
    av.add_argument(
        "--train-question-weights",
        type=float,
        nargs="+",
        help="relative frequency of each --questions type in training, e.g. 1 1 2 for twice as many "
        "count questions (default equal; testing is always equal)",
    )
    av.add_argument(
        "--train-view-weights",
        type=float,
        nargs=3,
        metavar=("BOTH", "AUDIO", "VIDEO"),
        help="relative frequency in training of samples with both views, audio only and video only "
        "(default 2 1 1, AVDigitsConfig.modality_mix; testing always keeps the default)",
    )
    av.add_argument(
        "--boundary-embeddings",
        nargs="?",
        const="per-modality",
        choices=["per-modality", "shared"],
        help="a learned start / end embedding on each modality's first / last token before the fusion: "
        "one pair per modality (per-modality, the value without one) or one pair for all (shared) "
        "(MMLongNetConfig.boundary_embeddings; default off)",
    )
    av.add_argument(
        "--global-modalities",
        nargs="+",
        choices=["text", "audio", "video"],
        help="modalities whose tokens attend to every fused token, densely, in the fusion layers of "
        "every model (or of --global-models) (MMLongNetConfig.global_modalities; e.g. text: the "
        "question; default none)",
    )
    av.add_argument(
        "--global-models",
        nargs="+",
        choices=list(MODEL_KINDS),
        help="the models given --global-modalities (and --global-read); the others keep their plain "
        "attention, e.g. dilated: a local-only baseline without global rows (default: every model)",
    )
    av.add_argument(
        "--global-read",
        action="store_true",
        help="with --global-modalities: every other fused token also reads their tokens, through a gate "
        "that starts at 0 (MMLongNetConfig.global_read; default off)",
    )
    av.add_argument("--dense-max-digits", type=int, help="largest K of the dense model (default 1024)")
    av.add_argument(
        "--pooling",
        choices=["mean", "text"],
        help="what the head reads (default text: the question's tokens)",
    )
    av.add_argument("--patch-size", type=int, help="video patch size on 8x8 frames (8: one token a frame)")
    av.add_argument(
        "--audio-subsampling",
        type=int,
        choices=[1, 2, 4, 8],
        help="the audio encoder's time stride over 10 ms mel frames (default 8: 12.5 tokens/s, ~7 a spoken "
        "digit; 4: 25 tokens/s, the encoder's own default)",
    )
    av.add_argument("--fusion-layers", type=int, help="multiway fusion layers (default 4)")
    av.add_argument("--modality-layers", type=int, help="layers of the audio and video stacks (default 1)")
    av.add_argument(
        "--modality-segments",
        type=int,
        nargs="+",
        help="audio and video stack segments (default 256 1024 4096)",
    )
    av.add_argument("--modality-rates", type=int, nargs="+", help="their dilation rates (default 1 2 4)")
    av.add_argument("--eval-examples", type=int, help="test examples per K (default 512)")
    av.add_argument(
        "--media-dtype",
        choices=list(MEDIA_DTYPES),
        help="the batches' audio and video dtype: float16 halves the bytes the loaders write, pin and copy "
        "to the GPU (a K = 256 batch holds ~280 MB of float32 audio); the encoders compute in float32 "
        "either way (default float16; float32 for the runs before it)",
    )
    rc = parser.add_argument_group("recall")
    rc.add_argument("--lengths", type=int, nargs="+", help="sequence lengths N (default 4096 16384 65536)")
    rc.add_argument("--dense-max-length", type=int, help="longest N of the dense model (default 16384)")
    rc.add_argument("--pairs", type=int, help="key-value pairs per sequence (default 64)")
    rc.add_argument("--queries", type=int, help="queries per sequence (default 32)")
    rc.add_argument("--num-keys", type=int, help="key ids (default 512)")
    rc.add_argument("--num-values", type=int, help="value ids; chance = 1 / this (default 64)")
    rc.add_argument("--num-fillers", type=int, help="filler ids (default 64)")
    rc.add_argument(
        "--distance-edges",
        type=int,
        nargs="+",
        help="distance buckets' lower edges (default 0 512 2048 8192 32768)",
    )
    rc.add_argument("--eval-sequences", type=int, help="test sequences per length (default 64)")
    lm = parser.add_argument_group("recall and bytes")
    lm.add_argument("--layers", type=int, help="decoder layers (default 4)")
    lm.add_argument("--local-window", type=int, help="the local model's one segment (default 2048)")
    by = parser.add_argument_group("bytes")
    by.add_argument("--window", type=int, help="bytes per window (default 32768)")
    by.add_argument(
        "--root", nargs="+", default=None,
        help="text directories (default: the standard library's and torch's Python sources)",
    )  # fmt: skip
    by.add_argument("--pattern", default=None, help="file pattern (default *.py)")
    by.add_argument(
        "--position-edges", type=int, nargs="+", help="position buckets' edges (default 0 2048 8192 32768)"
    )
    by.add_argument("--eval-windows", type=int, help="test windows (default 256)")
    args = parser.parse_args(argv)
    given = {k for k, v in vars(args).items() if v is not None}
    defaults = DEFAULTS[args.experiment] | (SMOKE[args.experiment] if args.smoke else {})
    for name, value in defaults.items():
        if name not in given:
            setattr(args, name, value)
    others = {name for table in DEFAULTS.values() for name in table} - set(defaults)
    for name in others & {name for name, value in vars(args).items() if value is None}:
        delattr(args, name)  # options of the other experiments
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.workers is None:
        args.workers = gpu_loader_workers() if torch.device(args.device).type == "cuda" else 0
    if "advance_loss" in given and getattr(args, "curriculum", None) != "grow":
        parser.error("--advance-loss ends the stages of --curriculum grow (avdigits and recall)")
    if "newest_share" in given and getattr(args, "curriculum", None) is None:
        parser.error("--newest-share draws among the lengths of a curriculum (avdigits and recall)")
    if "stage_shares" in given:
        lengths = getattr(args, "digits", None) or getattr(args, "lengths", None)
        if getattr(args, "curriculum", None) != "grow":
            parser.error("--stage-shares splits the time of --curriculum grow (avdigits and recall)")
        if len(args.stage_shares) != len(lengths) or min(args.stage_shares) <= 0:
            parser.error(f"--stage-shares needs one share > 0 per length {lengths}; got {args.stage_shares}")
    if not 0 < args.decay_share <= 1:
        parser.error(f"--decay-share must be in (0, 1], got {args.decay_share}")
    share = getattr(args, "newest_share", None)
    if share is not None and not 0 < share <= 1:
        parser.error(f"--newest-share must be in (0, 1], got {share}")
    weights = getattr(args, "train_question_weights", None)
    if weights is not None and (len(weights) != len(args.questions) or min(weights) < 0 or sum(weights) <= 0):
        parser.error(
            f"--train-question-weights needs one weight >= 0 per question type {args.questions}, "
            f"not all zero; got {weights}"
        )
    views = getattr(args, "train_view_weights", None)
    if views is not None and (min(views) < 0 or sum(views) <= 0):
        parser.error(
            f"--train-view-weights needs three weights >= 0 (both, audio, video), not all zero; got {views}"
        )
    if "rotary_fraction" in given and args.rotary_fraction != 1.0 and args.positions != "rope":
        parser.error(
            f"--rotary-fraction rotates part of each head for --positions rope; positions are "
            f"{args.positions!r} (recall's default is none: add --positions rope)"
        )
    if args.scalable_softmax is not None and args.scalable_softmax < 2:
        parser.error(f"--scalable-softmax takes a reference length N0 >= 2 keys, got {args.scalable_softmax}")
    if args.positions != "rope":  # avdigits' default share rotates part of rope's heads only
        args.rotary_fraction = 1.0
    window = getattr(args, "token_shift_window", None)
    if window is not None and not 0 <= window <= 1:
        parser.error(f"--token-shift-window must be a share in [0, 1], got {window}")
    if getattr(args, "global_read", False) and not args.global_modalities:
        parser.error("--global-read reads the tokens of --global-modalities: name them, e.g. text")
    if getattr(args, "global_models", None) and not args.global_modalities:
        parser.error("--global-models names the models given --global-modalities: name those too, e.g. text")
    if getattr(args, "graphed", False) and args.compile:
        parser.error("--graphed records the eager model's steps; leave --compile off with it")
    if args.segments is not None and len(args.segments) != len(args.rates):
        parser.error(f"--segments and --rates differ in length: {args.segments} and {args.rates}")
    return args


def gpu_loader_workers() -> int:
    """Loader workers beside a GPU: the cores less two (the training loop and the loader's pinning
    thread), at most 8. On the H200's host, 4 workers made 2,800 AV digits samples a second at
    K = 16, and the compiled model there takes ~2,300 a second (batch 64): 4 barely keep up."""
    return max(1, min(8, (os.cpu_count() or 2) - 2))


def main(argv: Sequence[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.tag is None:
        args.tag = "smoke" if args.smoke else slug(device_name(device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    run, table = RUNNERS[args.experiment]
    results = run(args, device, start)
    meta = run_metadata(args, device) | {"seconds": round(time.perf_counter() - start, 1)}
    stem = args.out / f"quality_{args.experiment}_{args.tag}"
    write_json(stem.with_suffix(".json"), {"meta": meta, "results": results})
    plot(args.experiment, results, args, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png ({meta['seconds']} s)")
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
