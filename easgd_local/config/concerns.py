"""The settings of a run, one dataclass per concern (torchtitan's way), each field declared
once with its :class:`~..settings.Setting`: flag, help, default, range, and whether a resume may
change it and boxes may differ in it. :class:`~.train.TrainConfig` is all of them together."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..settings import internal, setting
from .base import (DEFAULT_BETA, DEFAULT_BOX_BETA, DEFAULT_BOX_TAU, DEFAULT_DECAY_AT,
                   DEFAULT_DECAY_FACTOR, DEFAULT_EPOCHS, DEFAULT_MOMENTUM, PRECISIONS, SCHEDULES)


@dataclass
class AlgorithmSettings:
    """The algorithm, its rates and the local steps' learning-rate schedule."""

    algo: str = setting(
        "eamsgd", flag="--algo", concern="algorithm",
        help="The algorithm: {algorithms}.")
    lr: float | None = setting(
        None, flag="--lr", kind=float, bounds="> 0", concern="algorithm",
        default_text="the algorithm's",
        help="Learning rate eta; by default each algorithm's own, from the tuning sweeps: "
             "{lr_defaults}.")
    tau: int | None = setting(
        None, flag="--tau", kind=int, bounds=">= 1", concern="algorithm",
        default_text="the algorithm's",
        help="Communication period: an exchange every tau local steps (for sgd, msgd and ddp: "
             "how often the model is published for evaluation); by default {tau_defaults}.")
    beta: float | None = setting(
        None, flag="--beta", kind=float, bounds="(0, 1]", concern="algorithm",
        default_text=f"{DEFAULT_BETA:g}", help="Moving rate as beta = workers * alpha.")
    alpha: float | None = setting(
        None, flag="--alpha", kind=float, bounds="(0, 1]", concern="algorithm",
        help="Moving rate alpha given directly (not together with --beta).")
    momentum: float | None = setting(
        None, flag="--momentum", kind=float, bounds="[0, 1)", concern="algorithm",
        default_text=f"{DEFAULT_MOMENTUM:g}",
        help="Nesterov momentum delta of {momentum_algos}; an error with the others.",
        note="It acts in the workers' local steps; mdownpour's on the center.")
    weight_decay: float = setting(
        0.0, flag="--weight-decay", kind=float, bounds=">= 0", concern="algorithm",
        help="L2 penalty added to the gradient.", note="(The paper: 1e-4 on CIFAR.)")
    batch_size: int = setting(
        32, flag="--batch-size", kind=int, bounds=">= 1", concern="algorithm",
        help="Mini-batch size per worker.")
    seed: int = setting(
        0, flag="--seed", kind=int, bounds="[0, 2^32)", concern="algorithm",
        help="Seed of the initial weights (every worker starts from the same center); worker r "
             "orders its data with seed + r.")
    # The lr of each local step (schedule.py), per worker, in its local steps
    warmup: int = setting(
        0, flag="--warmup", kind=int, bounds=">= 0", concern="algorithm",
        help="Local steps of linear warm-up: step s < N takes lr * (s + 1) / N (PyTorch's "
             "LinearLR from lr / N); 0: none.")
    schedule: str = setting(
        "constant", flag="--schedule", choices=SCHEDULES, concern="algorithm",
        help="The lr after the warm-up: constant; cosine, down to 0 at the end of the budget of "
             "local steps; step, times --decay-factor at each --decay-at fraction of it. cosine "
             "and step need --steps or --epochs (--time-limit alone sets no budget).",
        note="Counted in each worker's local steps; a resumed run continues from its step "
             "count, over the budget the resume gives (a longer --steps stretches the decay).")
    decay_factor: float | None = setting(
        None, flag="--decay-factor", kind=float, bounds="(0, 1]", concern="algorithm",
        default_text=f"{DEFAULT_DECAY_FACTOR:g}",
        help="With --schedule step: the lr's factor at each decay.")
    decay_at: list[float] | None = setting(
        None, flag="--decay-at", kind=list, concern="algorithm",
        default_text=",".join(f"{a:g}" for a in DEFAULT_DECAY_AT),
        help="With --schedule step: comma-separated fractions of the budget of local steps, each "
             "in (0, 1), where the lr decays.")


@dataclass
class StopSettings:
    """When a run ends (the first rule reached; none given: the default epochs)."""

    steps: int | None = setting(
        None, flag="--steps", kind=int, bounds="> 0", concern="stop", resumable=True,
        help="Stop after this many local steps per worker.")
    epochs: float | None = setting(
        None, flag="--epochs", kind=float, bounds="> 0", concern="stop", resumable=True,
        default_text=f"{DEFAULT_EPOCHS:g} when no stop is given",
        help="Stop after this many passes over the training set by all workers together.",
        note="Each worker runs epochs * N / (workers * batch) steps.")
    time_limit: float | None = setting(
        None, flag="--time-limit", kind=float, bounds="> 0", concern="stop", resumable=True,
        help="Stop after this many seconds of training (start-up not counted).")
    target_accuracy: float | None = setting(
        None, flag="--target-accuracy", kind=float, bounds="(0, 1]", concern="stop",
        resumable=True, help="Stop once an evaluation of the center reaches this test accuracy.")
    target_hold: float = setting(
        0.0, flag="--target-hold", kind=float, bounds=">= 0", concern="stop", resumable=True,
        help="With --target-accuracy: once an evaluation first reaches it, train on for this "
             "share of the time that took, at least 3 s, then stop at the next evaluation at or "
             "above it (0: stop at once).")


@dataclass
class DataSettings:
    """The data set and the model."""

    dataset: str = setting(
        "mnist10k", flag="--dataset", concern="data",
        help="Data set: mnist10k (ships with the package), mnist, fashion-mnist, cifar10, "
             "cifar100, imagefolder (read from --data-dir), or your own data factory module:attr.",
        note="The torchvision sets are held as tensors on each worker's device; imagefolder "
             "reads train/ and val/ class directories from disk; see \"Your own model and data\".")
    data_dir: Path = setting(
        Path("datasets"), flag="--data-dir", kind=Path, concern="data", resumable=True,
        per_box=True,
        help="Root of the torchvision data sets (imagefolder: the directory holding train/ and "
             "val/).")
    download: bool = setting(
        False, flag="--download", kind=bool, concern="data", resumable=True, per_box=True,
        help="Download the data set into --data-dir if missing.")
    model: str = setting(
        "cnn", flag="--model", concern="data",
        help="cnn (small, for 28x28 digits), cifar-paper (the paper's 7-layer net), resnet18, "
             "torchvision:NAME (any classification model of torchvision.models), or your own "
             "model factory module:attr.",
        note="torchvision:NAME, e.g. torchvision:mobilenet_v3_small: no weights downloaded, "
             "num_classes from the data, grayscale repeated to 3 channels.")
    image_size: int | None = setting(
        None, flag="--image-size", kind=int, bounds=">= 1", concern="data",
        default_text="the data's",
        help="Input side: for imagefolder the images' own size when they all share one (else "
             "224), resized; for the other sets a center crop.")
    loader_workers: int = setting(
        0, flag="--loader-workers", kind=int, bounds=">= 0", concern="data", per_box=True,
        help="DataLoader processes per worker, for data read from disk (imagefolder, your own "
             "Dataset).")
    loss: str | None = internal(
        None, concern="data",
        help="A loss \"module:attr\" (outputs, targets) -> loss; None: cross-entropy.")
    metric: str | None = internal(
        None, concern="data",
        help="A metric \"module:attr\" (outputs, targets) -> score in [0, 1]; None: accuracy.")


@dataclass
class SystemSettings:
    """Workers, devices, threads, the center's lock, restarts and injected faults."""

    lock: bool = setting(
        True, flag="--lock/--no-lock", kind=bool, concern="system",
        help="Guard writes to shared state with locks; --no-lock runs Hogwild-style.")
    center_stripes: int = setting(
        8, flag="--center-stripes", kind=int, bounds=">= 1", concern="system",
        help="Stripes of the elastic center, each with its own lock: an exchange adds to them "
             "one by one, so that workers add to different stripes at once.",
        note="The default is measured by `easgd-local scale`; see docs/scale.md.")
    workers: int | None = setting(
        None, flag="--workers", kind=int, bounds=">= 1", concern="system",
        default_text="one per device; 2 on a CPU-only machine",
        help="Worker processes; several may share a GPU.", note="sgd and msgd run one.")
    devices: list[str] | None = setting(
        None, flag="--devices", kind=list, concern="system", per_box=True,
        default_text="every visible GPU, else cpu",
        help="Comma-separated devices, e.g. cuda:0,cuda:1 or cpu; workers are dealt round-robin.")
    precision: str = setting(
        "fp32", flag="--precision", choices=PRECISIONS, concern="system", resumable=True,
        help="Precision of the workers' forward and loss (autocast): fp32, bf16 or fp16 (with a "
             "gradient scaler per worker). Parameters, center, exchanges and checkpoints stay "
             "float32.",
        note="May change on a resume: the saved state is the same (fp16's loss scale starts "
             "afresh).")
    threads: int | None = setting(
        None, flag="--threads", kind=int, bounds=">= 1", concern="system", resumable=True,
        per_box=True, default_text="the cores split between the CPU workers",
        help="Intra-op threads per CPU worker.")
    max_restarts: int = setting(
        3, flag="--max-restarts", kind=int, bounds=">= 0", concern="system", resumable=True,
        per_box=True,
        help="Dead workers replaced (from the center) before the run gives up; a resumed run "
             "gets a fresh budget.")
    stall_timeout: float | None = setting(
        None, flag="--stall-timeout", kind=float, bounds="> 0", unit="seconds", concern="system",
        resumable=True, per_box=True,
        default_text="20 times the longest pause seen, at least 20 s",
        help="Seconds without a step after which a worker (stopped, hung, frozen holding a lock) "
             "is declared dead: killed and replaced.")
    faults: str | None = setting(
        None, flag="--fault", concern="system", per_box=True,
        help="Inject faults, for a demo: rank:step:kind[,...] with kind slow:F (that rank F "
             "times slower from that step), pause:S (stops S seconds), kill, exit, hang, nan; "
             "rank below --workers.")
    emulate_step: float | None = setting(
        None, flag="--emulate-step", kind=float, bounds="> 0", unit="seconds", concern="system",
        help="Emulated devices: each local step of a worker is a sleep of this many seconds "
             "instead of a gradient (a sleep costs no core, so many workers fit on few cores); "
             "the exchanges with the center are real. For measuring the shared center at "
             "scale, not for training.",
        note="The stand-in gradient pulls each worker toward its own fixed point, so the "
             "states differ and the exchanges carry real numbers; the center learns nothing. "
             "One thread per worker; not with ddp. See docs/scale.md.")


@dataclass
class EvaluationSettings:
    """How the reported model is evaluated while a run trains."""

    eval_every: float | None = setting(
        None, flag="--eval-every", kind=float, bounds="> 0", unit="seconds",
        concern="evaluation", resumable=True, per_box=True, default_text="from --eval-budget",
        help="Seconds between evaluations (with --eval-deferred: snapshots) of the center while "
             "training; by default spaced so that evaluation takes --eval-budget of the compute.")
    eval_budget: float = setting(
        0.1, flag="--eval-budget", kind=float, bounds="(0, 1]", concern="evaluation",
        resumable=True, per_box=True,
        help="Share of the run's compute (cores, or GPUs) that evaluation may take while "
             "training; one evaluation's cost is measured at the start.")
    eval_samples: int = setting(
        2000, flag="--eval-samples", kind=int, bounds=">= 0", concern="evaluation",
        resumable=True, per_box=True,
        help="Test samples per evaluation while training: a fixed, seeded subset (0: the whole "
             "test set); the final evaluation always uses the whole test set.")
    eval_deferred: bool = setting(
        False, flag="--eval-deferred", kind=bool, concern="evaluation", resumable=True,
        per_box=True,
        help="Only snapshot the center while training and evaluate the snapshots afterwards, so "
             "that evaluation takes no cores from the workers (--target-accuracy then cannot "
             "end the run early).",
        note="The snapshots' times are exact; they are evaluated on the whole test set.")
    # small enough that stopping never waits long for an evaluation
    eval_batch_size: int = internal(250, kind=int, bounds=">= 1", concern="evaluation")


@dataclass
class CheckpointSettings:
    """Checkpoints."""

    checkpoint_every: float | None = setting(
        60.0, flag="--checkpoint-every", kind=float, bounds="> 0", unit="seconds",
        concern="checkpoint", resumable=True, per_box=True,
        help="Seconds between checkpoints; one is also written at the end, on Ctrl-C or SIGTERM, "
             "and when the run fails.")


@dataclass
class BoxSettings:
    """Several boxes (multinode.py): the rounds between the boxes' centers."""

    multi_node: bool = setting(
        False, flag="--multi-node", kind=bool, concern="boxes", per_box=True,
        help="One box of several, started by torchrun (see docs/several-machines.md): "
             "the boxes' centers are tied elastically to a root every --box-tau exchanges.")
    box_tau: int | None = setting(
        None, flag="--box-tau", kind=int, bounds=">= 1", concern="boxes",
        default_text=str(DEFAULT_BOX_TAU),
        help="With --multi-node: exchanges of a box's center between two rounds between boxes.")
    box_beta: float | None = setting(
        None, flag="--box-beta", kind=float, bounds="(0, 1]", concern="boxes",
        default_text=f"{DEFAULT_BOX_BETA:g}",
        help="With --multi-node: the root's moving rate beta_root = boxes * alpha_root.")
    root_timeout: float = setting(
        60.0, flag="--root-timeout", kind=float, bounds="> 0", unit="seconds", concern="boxes",
        per_box=True,
        help="With --multi-node: seconds a round between boxes waits for the others before the "
             "run ends with an error.")
    # global rank of this box's worker 0 (set for --multi-node)
    rank_offset: int = internal(0, kind=int, concern="boxes", per_box=True)


@dataclass
class OutputSettings:
    """Where a run writes and what it prints."""

    out: Path | None = setting(
        None, flag="--out", kind=Path, concern="output", per_box=True,
        default_text="runs/<timestamp>-<algo>-p<workers>",
        help="Output directory (refused if it already holds a run, or anything a run does not "
             "write).")
    quiet: bool = setting(
        False, flag="--quiet", aliases=("-q",), kind=bool, concern="output", resumable=True,
        per_box=True, help="No progress bar and no summary table.")
