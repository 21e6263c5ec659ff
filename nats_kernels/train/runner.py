"""One training run on a synthetic benchmark: a scheme (CTS / NTS / NATS / annealed CFG, each
optionally with aw-loss and/or BRC) on a loss, a dataset and a seed, then the design §6 metrics."""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .. import _validate, schemes
from ..ops import annealed_weights
from .data import Mixture, get_dataset
from .losses import get_loss
from .metrics import evaluate

BASE_SCHEMES = ("cts", "nts", "nats", "annealed-cfg")
NATS_WEIGHTS = ("output", "loss")
MODIFIERS = ("aw", "brc")


@dataclass
class RunConfig:
    """One run's settings. Defaults: the BRC paper's synthetic setting (design §6) -- 3 linear
    layers of width 256 with LeakyReLU(0.2), batch 512, Adam (torch's default betas), lr_G 1e-3
    -- except lr_D: 1e-3 instead of the paper's 1e-4. With 1e-4 every scheme collapsed to 0-1 of
    ring8's 8 modes within the main job's budget of 2000 D steps on a 2-core CPU (README); pass
    ``lr_d=1e-4`` (``--lr-d 1e-4``) for the paper's value. Nesting: the NATS paper's N_d = 5
    and w = 1 -> 0.01 (the low-resolution preset).

    ``steps`` counts discriminator steps, the unit every scheme is budgeted in: cts makes one
    generator step per D step, nts/nats n_d(n_d+1)/2 per n_d D steps, annealed-cfg trains whole
    stages of ``cfg_M`` D steps (the budget rounds up) with x_epochs * ceil(N / batch) generator
    regression steps each. ``seconds_per_step`` in the record is wall time per D step, including
    the generator work that comes with it.
    """

    dataset: str = "ring8"
    loss: str = "vanilla"
    scheme: str = "cts"
    seed: int = 0
    steps: int = 2000
    device: str = "cpu"
    batch: int = 512
    # None: the benchmark's own latent size (2 for the mixtures, as the BRC paper; 32 for digits)
    z_dim: int | None = None
    width: int = 256  # the mixtures' MLPs; digits uses its fixed conv networks (design §6.4)
    lr_d: float = 1e-3  # the BRC paper: 1e-4 (see the docstring)
    lr_g: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    n_d: int = 5
    w_first: float = 1.0
    w_last: float = 0.01
    # where nats's weight w[i] acts in the generator step: "output", the NATS paper's
    # L_G(w[i] * D(G(z))) (its Algorithm 3, line 10), or "loss", w[i] * L_G(D(G(z))) (design §2.1)
    nats_weight: str = "output"
    # annealed-cfg: the official algorithm (RMSprop, N = 640, 10 epochs, approximator batch 64)
    # with a toy-sized step and learning rate; its discriminator loss is CFG's logistic one
    cfg_M: int = 15
    cfg_eta: float = 0.1
    cfg_lr: float = 1e-3
    cfg_N: int = 640
    cfg_batch: int = 64
    cfg_x_epochs: int = 10
    eval_samples: int = 512
    # > 0: also evaluate every eval_every D steps (the record's "curve"), with a generator of
    # its own, so that the training draws (and the final metrics) are those of a run without it
    eval_every: int = 0


def latent_size(cfg: RunConfig) -> int:
    """The generator's input size of a run: ``cfg.z_dim``, or the benchmark's own when None."""
    if cfg.z_dim is not None:
        return cfg.z_dim
    if cfg.dataset == "digits":
        from .digits import DIGITS_Z_DIM

        return DIGITS_Z_DIM
    return 2


def unused_settings(scheme: str) -> tuple[str, ...]:
    """The RunConfig settings a scheme does not read: annealed-cfg trains both networks with
    the official algorithm's own optimizer and learning rate (cfg_lr) and has no nesting; cts
    has no nesting either."""
    base = parse_scheme(scheme)[0]
    if base == "annealed-cfg":
        return ("lr_d", "lr_g", "betas", "n_d", "nats_weight")
    if base == "cts":
        return ("n_d", "nats_weight")
    if base == "nts":
        return ("nats_weight",)
    return ()


def parse_scheme(scheme: str) -> tuple[str, bool, bool]:
    """'nats+aw+brc' -> ('nats', True, True), with a clear error for anything else."""
    base, *mods = scheme.split("+")
    if base not in BASE_SCHEMES:
        raise ValueError(f"scheme: unknown base {base!r} in {scheme!r}; expected one of "
                         f"{list(BASE_SCHEMES)}, optionally followed by +aw and/or +brc")
    for m in mods:
        if m not in MODIFIERS:
            raise ValueError(f"scheme: unknown modifier {m!r} in {scheme!r}; expected +aw or +brc")
    if len(set(mods)) != len(mods):
        raise ValueError(f"scheme: repeated modifier in {scheme!r}")
    if base == "annealed-cfg" and "brc" in mods:
        raise ValueError("scheme: annealed-cfg fits its generator by regression onto moved "
                         "samples, so there is no generator loss for +brc to correct")
    return base, "aw" in mods, "brc" in mods


def mlp(d_in: int, d_out: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, width), nn.LeakyReLU(0.2), nn.Linear(width, width),
                         nn.LeakyReLU(0.2), nn.Linear(width, d_out))


def networks(dataset: str, dim: int, z_dim: int, width: int) -> tuple[nn.Module, nn.Module]:
    """(G, D) of a benchmark, built from the global RNG: the BRC paper's MLPs for the mixtures,
    the small conv networks of ``digits.make_networks`` for digits (both on flat vectors)."""
    if dataset == "digits":
        from .digits import make_networks

        return make_networks(z_dim)
    return mlp(z_dim, dim, width), mlp(dim, 1, width)


def _evaluate(samples, data, real) -> dict:
    """The metrics of a benchmark: design §6.2 for a mixture (``real(n)`` draws the reference
    points), §6.4 for digits (against all its images)."""
    if isinstance(data, Mixture):
        return evaluate(samples, data, real(samples.shape[0]))
    from .digits import evaluate_digits

    return evaluate_digits(samples)


def check_device(device) -> torch.device:
    """``device`` parsed by ``torch.device`` and available here, or a ``ValueError`` naming
    ``device``: an unknown string, a type this torch has no backend for, a backend that is not
    available (``cuda`` without a GPU, ``mps`` off a Mac, ...) or an index past its count."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"device: {device!r} is not a torch device "
                         f"({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)  # torch.cuda, torch.mps, torch.xpu, torch.mtia, ...
    is_available, where = getattr(backend, "is_available", None), f"torch.{dev.type}"
    if dev.type == "mps":
        is_available, where = torch.backends.mps.is_available, "torch.backends.mps"
    if not callable(is_available):
        raise ValueError(f"device: {device!r}: torch cannot train on {dev.type!r} devices; use "
                         f"cpu or an available accelerator (cuda, mps, ...)")
    if not is_available():
        raise ValueError(f"device: {device!r} is not available here "
                         f"({where}.is_available() is False)")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise ValueError(f"device: {device!r}: there are {count()} {dev.type} device(s) here, "
                         f"numbered from 0")
    return dev


#: ``torch.manual_seed``'s range; ``run`` also seeds with ``seed + 1``
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 2


# Settings are Python's own int and float (exact=True): a numpy number would not go into JSON.


def _int_setting(name: str, value, minimum: int) -> None:
    if not _validate.is_int(value, exact=True):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {value}")


def _finite_setting(name: str, value, what: str, *, zero_ok: bool) -> None:
    if (not _validate.is_number(value, exact=True) or not math.isfinite(value) or value < 0
            or (value == 0 and not zero_ok)):
        raise ValueError(f"{name}: expected a finite {what} {'>= 0' if zero_ok else '> 0'}, "
                         f"got {value!r}")


def check_config(cfg: RunConfig, world: int = 1) -> tuple[str, bool, bool]:
    """Every error a run could raise on its settings, before any training (and before anything
    is written): a ``ValueError`` whose message starts with the setting's name. Returns
    ``parse_scheme(cfg.scheme)``.

    ``world``: the number of processes that will train the run together (see :func:`run`); the
    global batch (and annealed-cfg's ``cfg_N`` and ``cfg_batch``) must split evenly over them,
    and several processes train on cpu (gloo) or on cuda (nccl, one GPU per process)."""
    if not _validate.is_int(world, exact=True) or world < 1:
        raise ValueError(f"world: expected an integer >= 1 (the number of processes), "
                         f"got {world!r}")
    base, use_aw, use_brc = parse_scheme(cfg.scheme)
    get_dataset(cfg.dataset)
    get_loss(cfg.loss)
    if base == "annealed-cfg" and cfg.loss != "vanilla":
        raise ValueError(f"loss: annealed-cfg trains D on CFG's logistic loss (vanilla); "
                         f"{cfg.loss!r} does not apply to it")
    for name in ("steps", "batch", "n_d", "width", "cfg_M", "cfg_N", "cfg_batch",
                 "cfg_x_epochs"):
        _int_setting(name, getattr(cfg, name), 1)
    if cfg.z_dim is not None:
        _int_setting("z_dim", cfg.z_dim, 1)
    _int_setting("eval_samples", cfg.eval_samples, 2)
    _int_setting("eval_every", cfg.eval_every, 0)
    if not _validate.is_int(cfg.seed, exact=True) or not SEED_MIN <= cfg.seed <= SEED_MAX:
        raise ValueError(f"seed: expected an integer from -2**63 to 2**64 - 2 (torch's seed "
                         f"range, less one: a run also seeds with seed + 1), got {cfg.seed!r}")
    # learning rates: 0 is allowed for the Adam ones (a frozen network, e.g. for an ablation);
    # AnnealedCFG requires a positive one
    for name in ("lr_d", "lr_g", "cfg_lr"):
        _finite_setting(name, getattr(cfg, name), "learning rate", zero_ok=name != "cfg_lr")
    if (not isinstance(cfg.betas, (tuple, list)) or len(cfg.betas) != 2
            or not all(_validate.is_number(b, exact=True) and 0 <= b < 1 for b in cfg.betas)):
        raise ValueError(f"betas: expected two numbers in [0, 1), got {cfg.betas!r}")
    for name in ("w_first", "w_last"):
        _finite_setting(name, getattr(cfg, name), "number", zero_ok=False)
    if cfg.nats_weight not in NATS_WEIGHTS:
        raise ValueError(f"nats_weight: expected one of {list(NATS_WEIGHTS)}, got "
                         f"{cfg.nats_weight!r}")
    _finite_setting("cfg_eta", cfg.cfg_eta, "step size", zero_ok=False)
    dev = check_device(cfg.device)
    if world > 1:
        split = [("batch", "the global batch")]
        if base == "annealed-cfg":
            split += [("cfg_N", "annealed-cfg's approximator samples per stage"),
                      ("cfg_batch", "annealed-cfg's approximator batch")]
        for name, what in split:
            v = getattr(cfg, name)
            if v % world:
                raise ValueError(f"{name}: {v} does not split evenly over {world} processes "
                                 f"({what} is divided among them); use a multiple of {world}")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device: {cfg.device!r}: {world} processes train on cpu (gloo) "
                             f"or cuda (nccl), not on {dev.type!r}")
        if dev.type == "cuda" and dev.index is not None:
            raise ValueError(f"device: {cfg.device!r} names one GPU, but each of the {world} "
                             f"processes trains on its own (cuda:<local rank>); pass 'cuda'")
    return base, use_aw, use_brc


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s real batches and latents (and, plus one, of its other draws):
    ``seed`` itself on rank 0, so that one process draws exactly what it always drew; on the
    other ranks a hash of (seed, rank) in [0, 2**64 - 2], a stream of its own."""
    if rank == 0:
        return seed
    digest = hashlib.blake2b(f"nats-kernels train {seed} {rank}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") % (2**64 - 1)


def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default ``torch.distributed`` process group; (0, 1) without
    one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_device(device: str, world: int) -> torch.device:
    """The device this rank trains on: ``device`` itself for one process; for several, a cuda
    rank uses ``cuda:<LOCAL_RANK>`` (torchrun's variable) or else ``cuda:<rank % GPU count>``."""
    dev = torch.device(device)
    if world == 1 or dev.type != "cuda":
        return dev
    import torch.distributed as dist

    local = os.environ.get("LOCAL_RANK")
    index = int(local) if local is not None else dist.get_rank() % torch.cuda.device_count()
    return torch.device("cuda", index)


def _data_parallel(module: nn.Module, device: torch.device, world: int) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel for several processes, else itself."""
    if world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(module, device_ids=[device.index])
    return DistributedDataParallel(module)


#: A private test hook (tests/test_train.py), not a setting: the rank named by this environment
#: variable raises after its first discriminator step, to check that a failing rank ends a
#: several-process command at once.
_FAIL_RANK_VARIABLE = "NATS_KERNELS_TRAIN_FAIL_RANK"


def _with_fail_hook(progress, rank: int):
    if os.environ.get(_FAIL_RANK_VARIABLE) != str(rank):
        return progress

    def failing(n):
        if progress is not None:
            progress(n)
        raise RuntimeError(f"rank {rank} fails on purpose ({_FAIL_RANK_VARIABLE}={rank}, a "
                           f"test hook)")

    return failing


def run(cfg: RunConfig, progress=None) -> dict:
    """Train one GAN and evaluate it. ``progress`` is an optional callable(n) told of every
    finished discriminator step (the CLI's progress bar). Returns the results.json record, with
    the evaluation samples under the key ``samples`` (a CPU tensor, for the figure).

    Data-parallel: called on every rank of an initialized ``torch.distributed`` process group
    of W > 1 processes (``nats-kernels train --nproc W``, or torchrun), the ranks train one run
    together. Both networks are built identically on every rank and wrapped in
    DistributedDataParallel (a cuda rank on ``cuda:<local rank>``); each rank draws its own real
    batches and latents (rank 0 from ``seed`` as one process does, the others from
    :func:`rank_seed`) of ``batch // W`` rows (annealed-cfg: ``cfg_N // W`` approximator samples
    in batches of ``cfg_batch // W``), and the gradients are averaged over the ranks: the
    gradient of the global batch. Every rank evaluates ``eval_samples`` points of its own (the
    generator is the same on all) and returns its record; ``nproc`` in the record is W. Without
    a process group (or with one of one process) nothing of this happens."""
    rank, world = _rank_and_world()
    base, use_aw, use_brc = check_config(cfg, world)
    progress = _with_fail_hook(progress, rank)
    data = get_dataset(cfg.dataset)
    loss = get_loss(cfg.loss)
    device = _rank_device(cfg.device, world)
    seed = rank_seed(cfg.seed, rank)
    z_dim = latent_size(cfg)
    torch.manual_seed(cfg.seed)  # the same initial networks on every rank
    gen = torch.Generator(device=device).manual_seed(seed)
    G, D = networks(cfg.dataset, data.dim, z_dim, cfg.width)
    G, D = G.to(device), D.to(device)
    G_dp, D_dp = _data_parallel(G, device, world), _data_parallel(D, device, world)

    def z(n, generator=gen):
        return torch.randn(n, z_dim, generator=generator, device=device)

    def real(n, generator=gen):
        return data.sample(n, generator, device)

    curve: list[dict] = []
    checkpoint = None
    if cfg.eval_every:
        # its own stream: the training draws are those of a run without a curve
        eval_gen = torch.Generator(device=device).manual_seed(seed + 2)

        def checkpoint(d_steps, sampler, final=False):
            # every eval_every D steps (with the generator steps made since) and at the end; a
            # later call at the same step count replaces the point (nested G steps, the end)
            if d_steps % cfg.eval_every and not final:
                return
            samples = sampler(cfg.eval_samples, eval_gen).detach()
            point = {"step": d_steps, **_evaluate(samples, data, lambda n: real(n, eval_gen))}
            if curve and curve[-1]["step"] == d_steps:
                curve[-1] = point
            else:
                curve.append(point)

    start = time.perf_counter()
    if base == "annealed-cfg":
        counts, sampler, extra = _run_cfg(cfg, world, seed, G_dp, D_dp, use_aw, z, real,
                                          progress, checkpoint)
    else:
        counts, sampler, extra = _run_nested(cfg, world, seed, base, G, D, G_dp, D_dp, loss,
                                             use_aw, use_brc, z, real, progress, checkpoint)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start

    samples = sampler(cfg.eval_samples).detach()
    metrics = _evaluate(samples, data, real)
    record = asdict(cfg)
    record["betas"] = list(cfg.betas)
    record["z_dim"] = z_dim
    record.update(metrics)
    if cfg.eval_every:
        record["curve"] = curve
    record.update(
        n_modes=data.n_modes,
        nproc=world,
        d_steps=counts[0],
        g_steps=counts[1],
        wall_seconds=wall,
        seconds_per_step=wall / counts[0],
        **extra,
        samples=samples.float().cpu(),
    )
    return record


class _CountingAW:
    """AWLoss whose rule case (1..5) of every step is counted on the device (read once, at the
    end), for the record's ``aw_case_counts``."""

    def __init__(self, discriminator, device):
        self.aw = schemes.AWLoss(discriminator)
        self.cases = torch.zeros(6, dtype=torch.long, device=device)

    def backward(self, loss_real, loss_fake, real_logits, fake_logits):
        out = self.aw.backward(loss_real, loss_fake, real_logits, fake_logits)
        self.cases.index_add_(0, self.aw.last_case.reshape(1), torch.ones_like(self.cases[:1]))
        return out

    def counts(self) -> list[int]:
        return self.cases[1:].tolist()


def _run_nested(cfg, world, seed, base, G, D, G_dp, D_dp, loss, use_aw, use_brc, z, real,
                progress, checkpoint=None):
    """``G``, ``D``: the networks; ``G_dp``, ``D_dp``: the same, DDP-wrapped for several
    processes. A forward goes through a wrapper only where a plain ``backward()`` must average
    its gradients over the ranks (D's plain step, G's plain step); AWLoss and BRC average their
    own (they take the wrappers), and the no-grad and evaluation forwards use the networks."""
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=cfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=cfg.betas)
    device = next(G.parameters()).device
    aw = _CountingAW(D_dp, device) if use_aw else None
    brc = schemes.BRC(G_dp, D_dp) if use_brc else None
    batch = cfg.batch // world
    D_d = D if aw is not None else D_dp  # the discriminator step's forward
    G_g = G if brc is not None else G_dp  # the generator step's forward
    if base == "cts":
        n_d, weights = 1, None
    elif base == "nts":
        n_d, weights = cfg.n_d, None
    else:  # nats: the decreasing geometric weights, as Python numbers
        n_d = cfg.n_d
        weights = annealed_weights(cfg.w_first, cfg.w_last, n_d, dtype=torch.float64).tolist()
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    r_sum = torch.zeros((), dtype=torch.float64, device=device)
    on_output = base == "nats" and cfg.nats_weight == "output"

    def d_step():
        xr = real(batch)
        with torch.no_grad():
            xf = G(z(batch))
        real_logits, fake_logits = D_d(xr), D_d(xf)
        loss_real, loss_fake = loss.real(real_logits), loss.fake(fake_logits)
        if loss.gp_weight:
            loss_fake = loss_fake + loss.penalty(D_d, xr, xf, gen)
        opt_d.zero_grad(set_to_none=True)
        if aw is not None:
            aw.backward(loss_real, loss_fake, real_logits, fake_logits)
        else:
            (loss_real + loss_fake).backward()
        opt_d.step()

    def g_step(w):
        fake = G_g(z(batch))
        # D's gradients from here are dropped (opt_g steps G only; D's step zeroes them first),
        # so the plain network: no all-reduce of them
        fake_logits = D(fake)
        if on_output:  # the NATS paper: the weight on D's output inside the generator loss
            F_loss = loss.gen(w * fake_logits)
        else:
            F_loss = w * loss.gen(fake_logits)
        opt_g.zero_grad(set_to_none=True)
        if brc is not None:
            # f: the discriminator's loss on the same, non-detached fake batch (design §5)
            f = loss.real(D(real(batch))) + loss.fake(fake_logits)
            r_sum.add_(brc.backward(F_loss, f))  # BRC's r, summed on device
        else:
            F_loss.backward()
        opt_g.step()

    def sampler(n, generator=None):
        with torch.no_grad():
            return G(z(n) if generator is None else z(n, generator))

    d_steps = g_steps = 0
    while d_steps < cfg.steps:
        for kind, w in schemes.nested_schedule(n_d, weights):
            if kind == "D":
                if d_steps == cfg.steps:
                    break
                d_step()
                d_steps += 1
                if progress is not None:
                    progress(1)
            else:
                g_step(w)
                g_steps += 1
                if checkpoint is not None:
                    checkpoint(d_steps, sampler)
    if checkpoint is not None:
        checkpoint(d_steps, sampler, final=True)

    extra = {}
    if aw is not None:
        extra["aw_case_counts"] = aw.counts()
    if brc is not None:
        extra["brc_mean_r"] = float(r_sum) / g_steps
    return (d_steps, g_steps), sampler, extra


def _run_cfg(cfg, world, seed, G, D, use_aw, z, real, progress, checkpoint=None):
    """``G``, ``D``: DDP-wrapped for several processes (AnnealedCFG unwraps them to generate);
    each rank fits its own ``cfg_N // world`` samples in batches of ``cfg_batch // world``."""
    device = next(G.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    aw = _CountingAW(D, device) if use_aw else None
    batch, n, n_batch = cfg.batch // world, cfg.cfg_N // world, cfg.cfg_batch // world
    model = schemes.AnnealedCFG(
        G, D, M=cfg.cfg_M, eta=cfg.cfg_eta, z_dim=latent_size(cfg), lr=cfg.cfg_lr,
        weights=annealed_weights(cfg.w_first, cfg.w_last, cfg.cfg_M),
        batch_size=n_batch, N=n, x_epochs=cfg.cfg_x_epochs, rng=gen,
        d_backward=aw.backward if aw is not None else None,
    )

    def real_batches():
        while True:
            yield real(batch)

    def sampler(n, generator=None):
        if generator is None:
            return model.generate(n)
        model.rng, training = generator, model.rng  # the latents from ``generator`` instead
        try:
            return model.generate(n)
        finally:
            model.rng = training

    source = real_batches()
    d_steps = g_steps = 0
    while d_steps < cfg.steps:  # whole stages: the budget rounds up to a multiple of M
        model.train_stage(source)
        d_steps += cfg.cfg_M
        g_steps += cfg.cfg_x_epochs * -(-n // n_batch)
        if progress is not None:
            progress(cfg.cfg_M)
        if checkpoint is not None:
            checkpoint(d_steps, sampler, final=d_steps >= cfg.steps)
    extra = {"aw_case_counts": aw.counts()} if aw is not None else {}
    return (d_steps, g_steps), sampler, extra
