"""The scenario file: a typed schema (pydantic) that rejects bad input before anything runs.

A scenario says what to train (``data``, ``model``), how (``strategy``, ``train``,
``upload``, ``defense``), where (``engine``) and what to audit (``audit``). Every model
forbids unknown keys, so a typo is an error naming its key path, never a silent default.
Strategy hyperparameters live beside ``strategy.name`` and are validated by the
strategy's own parameter model from the registry.
"""

from __future__ import annotations

import copy
import math
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from strategies.settings import TrainConfig

from . import strict_yaml


class ScenarioError(ValueError):
    """A scenario (file, override or value) that cannot run; the message is one line.

    Cut to its first line and ``MESSAGE_MAX`` characters: whatever a message echoes, the
    command prints one readable line."""

    def __init__(self, message: str = ""):
        line = (str(message).splitlines() or [""])[0]
        super().__init__(line if len(line) <= MESSAGE_MAX else line[: MESSAGE_MAX - 3] + "...")


MESSAGE_MAX = 500
# A value echoed in a message: reprlib abbreviates as it goes, so a 10^9-item list is never
# turned into text in full (a YAML alias bomb once printed a 351 MB line).
_ECHO = reprlib.Repr()
_ECHO.maxstring = _ECHO.maxother = 200
_ECHO.maxlist = _ECHO.maxtuple = _ECHO.maxdict = _ECHO.maxset = 8
_ECHO.maxlevel = 3


def short(value: Any) -> str:
    """``repr(value)``, at most 200 characters, for echoing input in an error message."""
    text = _ECHO.repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


# The largest seed: torch's generators take seeds below 2**64 and the attacks add small offsets to
# theirs; numpy takes any. Larger ones passed validation and failed mid-run (Overflow when unpacking).
SEED_MAX = 2**63 - 1
# engine.torch_threads: far beyond any machine's cores (more threads only contend); a typo like 10**6
# would otherwise ask the OS for a million threads per client process.
TORCH_THREADS_MAX = 1024
# data.image_size (and python -m attacks --image-size): the smallest side the models take.
IMAGE_SIZE_MIN = 4


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PartitionConfig(_Strict):
    name: Literal["iid", "dirichlet", "inner_dirichlet", "pathological", "shards"] = Field(
        "iid", description="how the training set is split over clients (flwr-datasets' partitioners)")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (dirichlet, inner_dirichlet)")
    classes_per_client: int = Field(2, ge=1, description="k classes per client (pathological)")
    shards_per_client: int = Field(2, ge=1, description="shards per client (shards)")
    min_partition_size: int = Field(2, ge=0, description="resample until every client has this many (dirichlet)")


class SyntheticConfig(_Strict):
    classes: int = Field(10, ge=2, description="number of classes")
    channels: int = Field(1, ge=1, le=3, description="image channels")
    size: int = Field(16, ge=4, le=64, description="image side in pixels")
    train: int = Field(2000, ge=10, description="training images")
    test: int = Field(500, ge=10, description="test images (the central evaluation)")


class DataConfig(_Strict):
    dataset: Literal["digits", "synthetic", "patches", "mnist", "cifar10"] = Field(
        "digits", description="digits: scikit-learn's, embedded; synthetic: seeded class-conditional images; "
        "patches: 32x32 patches of two sample photographs; mnist, cifar10: local files or the hub")
    root: str | None = Field(None, description="folder holding MNIST IDX files or CIFAR-10 python batches")
    source: Literal["local", "hub"] = Field("local", description="hub: mnist/cifar10 through flwr-datasets "
                                            "(needs the network)")
    image_size: int | None = Field(None, ge=IMAGE_SIZE_MIN, le=256, description="resize images to this side")
    num_clients: int = Field(10, ge=1, description="clients the training set is split over")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="each client's validation split")
    partition: PartitionConfig = PartitionConfig()
    synthetic: SyntheticConfig = SyntheticConfig()


class ModelConfig(_Strict):
    name: Literal["mlp", "lenet", "cnn", "resnet18"] = Field(
        "mlp", description="lenet: DLG's sigmoid LeNet; resnet18 with GroupNorm")
    hidden: list[int] = Field(default_factory=lambda: [256], description="mlp: hidden layer widths")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout rate (0: none)")
    dropout_at: Literal["classifier", "hidden", "both"] = Field(
        "classifier", description="where dropout goes: before the classifier, after hidden blocks, or both")
    init: Literal["default", "uniform"] = Field("default", description="uniform: DLG's uniform(-0.5, 0.5)")

    @field_validator("hidden")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(h < 1 for h in v):
            raise ValueError("hidden layer widths must be >= 1")
        return v


class StrategyConfig(BaseModel):
    """``name`` plus that strategy's hyperparameters (checked against the registry)."""

    model_config = ConfigDict(extra="allow")
    name: str = "fedavg"

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RayConfig(_Strict):
    address: str | None = Field(None, description="join an existing Ray cluster: HOST:PORT of its head, or auto "
                                "(RAY_ADDRESS, or a `ray start` cluster on this machine); null: a private local Ray")
    num_cpus_per_client: float = Field(1.0, gt=0)
    num_actors: int | None = Field(None, ge=1, description="default: as many as CPUs allow")
    vectorized: bool = Field(False, description="each actor trains its share of a round's clients together, as engine "
                             "vectorized does (in chunks of engine.vectorized.chunk; what it refuses, this refuses)")
    num_gpus_per_client: float = Field(0.0, ge=0, description="GPUs per client actor (fractions share one: 0.25 is "
                                       "four actors a GPU); 0: Ray hides the GPUs from the actors")
    num_gpus_audit: float | None = Field(None, ge=0, description="the audit actor's GPU share (default: a client "
                                         "actor's, num_gpus_per_client)")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        """Caught here, a malformed address is one line; Ray itself would log and retry it."""
        if v is None or v == "auto":
            return v
        host, sep, port = v.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")  # an IPv6 literal, [::1]:6379
        if (not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host
                or not (bracketed or re.fullmatch(r"[A-Za-z0-9._-]+", host))):
            raise ValueError("expected auto or HOST:PORT of a Ray cluster's head (e.g. 10.0.0.5:6379; "
                             "Ray Client ray:// addresses are not supported)")
        return v


class VectorizedConfig(_Strict):
    chunk: int = Field(32, ge=1, description="clients trained together at most (memory: about chunk x (model + "
                       "batch activations)); a round's clients are cut into equal chunks")


class EngineConfig(_Strict):
    name: Literal["inline", "ray", "vectorized"] = "inline"
    ray: RayConfig = RayConfig()
    vectorized: VectorizedConfig = VectorizedConfig()
    timeout_s: float = Field(3600.0, gt=0, description="per-round wait for replies")
    torch_threads: int = Field(
        1, ge=1, le=TORCH_THREADS_MAX, description="torch intra-op threads per client process; 1 is fastest for small models "
        "and gives bit-identical results on every engine")
    device: str = Field("auto", description="where every engine, the central evaluation and the audit compute: auto "
                        "(cuda if torch sees one, else mps, else cpu), cpu, cuda, cuda:N or mps (fedsim.world.device)")

    @field_validator("device")
    @classmethod
    def _device_seen(cls, v: str) -> str:
        """A device torch does not see here is refused now, not at the first client call."""
        return _checked_device(("engine", "device"), v)

    @model_validator(mode="after")
    def _gpus_for_ray(self) -> "EngineConfig":
        # Ray hides the CUDA GPUs from an actor given no GPU share: a named one would fail in every client call.
        if self.name == "ray" and self.device.startswith("cuda") and self.ray.num_gpus_per_client == 0:
            raise _PathError(("engine", "ray", "num_gpus_per_client"), f"engine.device {self.device} on engine ray "
                             f"needs a GPU share per client actor (> 0, fractions allowed; 0 hides the GPUs)")
        if self.name == "ray" and _gpu_index(self.device) > 0:
            raise _PathError(("engine", "device"), _RAY_INDEX)
        return self


# A Ray actor sees only the GPU (or the share of one) Ray gives it, as cuda:0.
_RAY_INDEX = "on engine ray each actor sees only the GPU Ray assigns it (as cuda:0): use cuda or auto"


def _gpu_index(name: str) -> int:
    return int(name.partition(":")[2] or 0) if name.startswith("cuda") else 0


def _checked_device(loc: tuple[str, ...], name: str) -> str:
    from ..world.device import device_problem

    problem = device_problem(name)
    if problem is not None:
        raise _PathError(loc, problem)
    return name


class OutputConfig(_Strict):
    dir: str | None = Field(None, description="default runs/<name>")

    @field_validator("dir")
    @classmethod
    def _a_path(cls, v: str | None) -> str | None:
        # "" would be the working folder; a NUL byte no file system takes (fedsim.run.outdir checks the rest)
        if v is not None and (not v.strip() or "\0" in v):
            raise _PathError(("output", "dir"), f"must be a folder path, got {short(v)}")
        return v
    plot: bool = True
    progress: bool = True
    checkpoint_every: int = Field(1, ge=0, description="write the run's checkpoint every N rounds (and after the "
                                  "last) for `fedsim resume`; 0: never")
    trackers: list[str] = Field(default_factory=list, description="experiment trackers that report the run "
                                "(fedsim.trackers): mlflow, tensorboard")

    @field_validator("trackers")
    @classmethod
    def _known_trackers(cls, v: list[str]) -> list[str]:
        from ..trackers import TRACKERS  # the registry; a leaf, so no import cycle

        for name in v:
            if name not in TRACKERS:
                raise _PathError(("output", "trackers"), f"unknown tracker {short(name)}; allowed: "
                                 f"{', '.join(TRACKERS)}")
        if len(set(v)) < len(v):
            raise _PathError(("output", "trackers"), f"a tracker is listed twice ({', '.join(v)})")
        return v


class AuditConfig(_Strict):
    """The per-round privacy audit: which attack the server runs on which clients' uploads."""

    attack: str = Field("auto", description="a registered attack (python -m attacks --help), or auto")
    attack_config: dict[str, Any] = Field(default_factory=dict, description="the attack's settings")
    every: int = Field(1, ge=1, description="audit every N rounds (and always the last)")
    clients: int | list[int] = Field(1, description="how many participants (seeded choice), or partition ids")
    threat: Literal["update", "gradient"] = Field(
        "update", description="update: what the client uploaded; gradient: one batch gradient on request")
    batch_size: int | None = Field(None, ge=1, description="gradient threat's batch (default train.batch_size)")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="the attack's own seed")
    support: bool = Field(True, description="update threat through a sparsifying codec: match only the "
                          "coordinates the reply carried; false: the decoded upload, unsent ones as 0")
    sketch_space: bool = Field(True, description="update threat through a codec with a space of its own: match "
                               "the simulated update mapped there (S u(x')) against what travelled (the server knows "
                               "S); false: the decoded upload (S^T y)")
    membership: Literal["none", "loss", "lira"] = Field(
        "none", description="membership inference on the attacked model beside the reconstruction: loss (Yeom et "
        "al.'s loss threshold; AUC and TPR at 0.1% FPR in audit.jsonl, fedsim.audit.membership) or lira (offline "
        "LiRA, Carlini et al. 2022, with shadow models fedsim trains: fedsim.audit.lira; update threat only)")
    membership_shadows: int = Field(8, ge=2, description="lira: shadow (OUT) models trained per audited round "
                                    "and client")
    device: str | None = Field(None, description="where the attacks compute (auto, cpu, cuda, cuda:N, mps); "
                               "default: engine.device")

    @field_validator("device")
    @classmethod
    def _device_seen(cls, v: str | None) -> str | None:
        return v if v is None else _checked_device(("audit", "device"), v)

    @model_validator(mode="after")
    def _lira_needs_an_update(self) -> "AuditConfig":
        if self.membership == "lira" and self.threat != "update":
            raise _PathError(("audit", "membership"), "lira needs threat: update (its shadows replay a client's "
                             "round of local training; the gradient threat attacks the global model, which no "
                             "such round produced)")
        return self

    @field_validator("clients")
    @classmethod
    def _clients(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int) and v < 1:
            raise ValueError("a count must be >= 1")
        if isinstance(v, list) and (not v or any(i < 0 for i in v) or len(set(v)) != len(v)):
            raise ValueError("a list must hold distinct partition ids >= 0")
        return v


class PrivacyConfig(_Strict):
    """Empirical privacy beside the accountant: the one-shot canary estimate of Andrew et al. (ICLR 2024),
    ``fedsim.privacy``. Canary clients' updates (random directions at the clip norm) join the aggregate;
    ``epsilon_est`` per audited round in metrics.jsonl."""

    method: Literal["canaries"] = "canaries"
    canaries: int = Field(1000, ge=2, description="canaries inserted (observed)")
    unobserved: int | None = Field(None, ge=2, description="canaries never inserted, the all_iterates null "
                                   "(default: as many as canaries)")
    threat: Literal["final", "all_iterates"] = Field("final", description="final: cosine with the model delta since "
                                                     "round 0; all_iterates: max over rounds of the cosine with "
                                                     "each round's delta")
    every: int = Field(1, ge=1, description="estimate every N rounds (and always the last)")
    repeats: int = Field(1, ge=1, description="times each canary is inserted over the run")
    norm: float | None = Field(None, gt=0, description="a canary update's L2 norm (default: the bound "
                               "of the defense that bounds each update, else 1)")
    delta: float | None = Field(None, gt=0, lt=1, description="delta of the estimate (default: that defense's, "
                                "else 1e-5)")
    bootstrap: int = Field(100, ge=0, description="bootstrap resamples of the canaries for the interval; 0: none")


class DistributionConfig(_Strict):
    """A per-client quantity of the system model, drawn (seeded) from a named distribution: ``constant``
    (``value``), ``uniform`` (``low``, ``high``) or ``lognormal`` (``median``, ``sigma``: the log's
    standard deviation). A bare number is a constant (``fedsim.world.system``)."""

    dist: Literal["constant", "uniform", "lognormal"] = "constant"
    value: float | None = Field(None, gt=0, description="constant")
    low: float | None = Field(None, gt=0, description="uniform")
    high: float | None = Field(None, gt=0, description="uniform")
    median: float | None = Field(None, gt=0, description="lognormal")
    sigma: float = Field(0.5, ge=0, description="lognormal: standard deviation of the log")

    @model_validator(mode="before")
    @classmethod
    def _number_is_constant(cls, v: Any) -> Any:
        return {"dist": "constant", "value": v} if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _complete(self) -> "DistributionConfig":
        needs = {"constant": ("value",), "uniform": ("low", "high"), "lognormal": ("median",)}[self.dist]
        missing = [k for k in needs if getattr(self, k) is None]
        if missing:
            raise ValueError(f"{self.dist} needs {' and '.join(missing)}")
        if self.dist == "uniform" and self.high < self.low:
            raise ValueError(f"uniform needs low <= high (got {self.low:g} > {self.high:g})")
        return self


class SystemConfig(_Strict):
    """Device heterogeneity for the virtual clock (``fedsim.world.system``, docs/time.md): per client a
    compute speed and a link, drawn from the distributions here (seeded) or read from a CSV trace."""

    step_s: DistributionConfig = Field(DistributionConfig(value=0.05), description="seconds per local step")
    latency_s: DistributionConfig = Field(DistributionConfig(value=0.05), description="one-way link latency")
    down_mbps: DistributionConfig = Field(DistributionConfig(value=20.0), description="downlink, Mbit/s")
    up_mbps: DistributionConfig = Field(DistributionConfig(value=5.0), description="uplink, Mbit/s")
    trace: str | None = Field(None, description="CSV of devices (columns step_s, latency_s, down_mbps, up_mbps), "
                              "one a row: client i gets row i mod rows; replaces the distributions")
    correlate: Literal["none", "label"] = Field("none", description="label: the slowest devices go to the clients "
                                                "holding the largest share of slow_classes")
    slow_classes: list[int] = Field(default_factory=list, description="the classes slow devices hold (correlate: label)")

    @model_validator(mode="after")
    def _classes_named(self) -> "SystemConfig":
        if self.correlate == "label" and not self.slow_classes:
            raise ValueError("correlate: label needs slow_classes (the classes the slow devices hold)")
        if any(c < 0 for c in self.slow_classes):
            raise ValueError("slow_classes must be class indices >= 0")
        return self


def _refuse_nonfinite(loc: tuple[str, ...], values: Any) -> None:
    """_PathError at the first float in ``values`` (nested dicts and lists) that is inf or nan."""
    stack = [(loc, values)]
    while stack:
        at, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise _PathError(at, f"must be finite, got {value}")
        if isinstance(value, dict):
            stack.extend(((*at, str(k)), v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend(((*at, str(i)), v) for i, v in enumerate(value))


def _numeric(annotation: Any) -> bool:
    """Whether a field's type is a number (int or float, optionally in a union with None or a list),
    and not also a bool."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return any(a in (int, float) for a in args) and bool not in args


def _list_of_numbers(annotation: Any) -> bool:
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return any(typing.get_origin(a) is list and typing.get_args(a) and typing.get_args(a)[0] in (int, float)
               for a in args)


def _submodels(annotation: Any) -> list[type[BaseModel]]:
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def _refuse_bools(model: type[BaseModel], raw: dict, loc: tuple[str, ...]) -> None:
    """_PathError at the first field of ``model`` (and its nested models) given a bool where its type
    is a number or a list of numbers."""
    for name, field in model.model_fields.items():
        if name not in raw:
            continue
        value, at = raw[name], (*loc, name)
        if isinstance(value, bool) and _numeric(field.annotation):
            raise _PathError(at, f"must be a number, got {str(value).lower()}")
        if isinstance(value, list) and _list_of_numbers(field.annotation):
            for i, item in enumerate(value):
                if isinstance(item, bool):
                    raise _PathError((*at, str(i)), f"must be a number, got {str(item).lower()}")
        if isinstance(value, dict):
            for sub in _submodels(field.annotation):
                _refuse_bools(sub, value, at)


def _refuse_bools_in_registries(raw: dict) -> None:
    """_refuse_bools on the strategy's, the codec's and each defense's settings (their own params
    models); names that are not registered are left to the validators that say so."""
    from defenses import defense_names, defense_params
    from strategies import get_strategy, strategy_names
    from strategies.compression import codec_class, codec_names

    strategy = raw.get("strategy")
    if isinstance(strategy, dict) and strategy.get("name", "fedavg") in strategy_names():
        _refuse_bools(get_strategy(strategy.get("name", "fedavg")).params, strategy, ("strategy",))
    upload = raw.get("upload")
    if isinstance(upload, dict) and upload.get("codec", "none") in codec_names():
        _refuse_bools(codec_class(str(upload.get("codec", "none"))).Params, upload, ("upload",))
    defense = raw.get("defense")
    blocks = defense if isinstance(defense, list) else [defense]
    for i, block in enumerate(blocks):
        if isinstance(block, dict) and block.get("name") in defense_names():
            _refuse_bools(defense_params(block["name"]), block, ("defense", *((str(i),) if isinstance(defense, list) else ())))


def _upload_section(v: Any) -> Any:
    """``none``, or ``{codec: name, <that codec's settings>}`` checked by the codec's params model."""
    from strategies.compression import codec_class, codec_names

    if v is None or v == "none":
        return "none"
    if not isinstance(v, dict):
        raise _PathError(("upload",), f"none, or a mapping: codec (one of {', '.join(codec_names())}) and its "
                         f"settings (ratio ...)")
    name = v.get("codec", "none")
    try:
        cls = codec_class(str(name))
    except KeyError as exc:
        raise _PathError(("upload", "codec"), str(exc.args[0])) from None
    settings = {k: val for k, val in v.items() if k != "codec"}
    try:
        params = cls.Params(**settings)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(map(str, err["loc"]))
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(["codec", *cls.Params.model_fields])
            raise _PathError(("upload", *loc), f"unknown key for {name}; allowed: {allowed}") from None
        raise _PathError(("upload", *loc) if loc else ("upload",), _describe(err)) from None
    if name == "none":
        return "none"
    _refuse_nonfinite(("upload",), params.model_dump())  # before the json dump turns nan into None
    return {"codec": name, **params.model_dump(mode="json")}


class Scenario(_Strict):
    name: str = Field("scenario", description="a single folder name: runs/<name>/ holds the results")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="one seed: identical metrics run to run and engine to engine")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    strategy: StrategyConfig = StrategyConfig()
    train: TrainConfig = TrainConfig()
    upload: Any = Field("none", description="none, or a codec with its settings (upload.codec, upload.ratio ...)")
    defense: Any = Field("none", description="none, a defense with its settings (name: one of the defense "
                         "registry's, defenses.registry), or a list of them applied in order")
    audit: Literal["none"] | AuditConfig = Field("none", description="none, or the per-round privacy audit")
    privacy: Literal["none"] | PrivacyConfig = Field("none", description="none, or empirical privacy by canaries")
    system: Literal["none"] | SystemConfig = Field("none", description="none, or the devices of the virtual clock "
                                                   "(docs/time.md)")
    engine: EngineConfig = EngineConfig()
    output: OutputConfig = OutputConfig()

    _check_upload = field_validator("upload", mode="before")(lambda cls, v: _upload_section(v))

    @model_validator(mode="before")
    @classmethod
    def _finite(cls, raw: Any) -> Any:
        """No setting means anything at inf or nan, in any section (the typed ones, and the
        registries' strategy, codec, defense and attack settings), and JSON (summary.json,
        the scenario sent to clients) cannot carry them (a json dump made an inf mu None,
        reported later as "data.strategy.mu ... got None"): refused under their own key, as
        written (.inf) here, and as coerced from text ("inf") by ``_finite_as_validated``."""
        _refuse_nonfinite((), raw)
        return raw

    @model_validator(mode="before")
    @classmethod
    def _numbers_not_bools(cls, raw: Any) -> Any:
        """``true`` where a number goes is refused, not read as 1 (pydantic's lax mode takes it):
        in the typed sections and in the registries' strategy, codec and defense settings."""
        if isinstance(raw, dict):
            _refuse_bools(cls, raw, ())
            _refuse_bools_in_registries(raw)
        return raw

    @model_validator(mode="after")
    def _finite_as_validated(self) -> "Scenario":
        _refuse_nonfinite((), self.model_dump(exclude={"defense"}))
        blocks = self.defenses()
        for i, block in enumerate(blocks):  # named as _defense names them: defense.<key>, or defense.<i>.<key>
            _refuse_nonfinite(("defense", *((str(i),) if len(blocks) > 1 else ())), block.model_dump())
        try:
            _refuse_nonfinite(("strategy",), self.strategy_params().model_dump())
        except (KeyError, ValidationError):  # an unknown strategy, bad settings: _strategy_known says which
            pass
        return self

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        """The name is a folder under runs/: one path component, never . or .. (the working
        folder or its parent), at most 255 bytes (most file systems' NAME_MAX)."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v) or v in (".", ".."):
            raise _PathError(("name",), f"must be a single folder name of letters, digits, _ . - (not . or ..), "
                             f"got {short(v)}")
        if len(v) > 255:
            raise _PathError(("name",), f"must be at most 255 characters (a folder name), got {len(v)}")
        return v

    @field_validator("audit", mode="before")
    @classmethod
    def _audit(cls, v: Any) -> Any:
        if v is None or v == "none":
            return "none"
        if not isinstance(v, dict):
            raise _PathError(("audit",), "none, or a mapping (attack, attack_config, every, clients, threat, batch_size)")
        try:
            return AuditConfig(**v)
        except ValidationError as exc:
            err = exc.errors()[0]
            if isinstance((err.get("ctx") or {}).get("error"), _PathError):  # a validator's own line (audit.device)
                raise err["ctx"]["error"] from None
            loc = [str(p) for p in err["loc"] if not isinstance(p, int) or err["loc"][0] != "clients"]
            raise _PathError(("audit", *loc[:1]), _describe(err, AuditConfig)) from None

    @field_validator("system", mode="before")
    @classmethod
    def _system(cls, v: Any) -> Any:
        if v is None or v == "none":
            return "none"
        if not isinstance(v, dict):
            raise _PathError(("system",), "none, or a mapping (step_s, latency_s, down_mbps, up_mbps, trace, "
                             "correlate, slow_classes)")
        try:
            return SystemConfig(**v)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = tuple(str(p) for p in err["loc"])
            model = DistributionConfig if len(loc) > 1 else SystemConfig
            raise _PathError(("system", *loc), _describe(err, model)) from None

    @model_validator(mode="after")
    def _system_fits(self) -> "Scenario":
        """``train.deadline_s`` runs on the virtual clock; slow classes exist (a codec's own rules on a
        deadline are its ``check``'s)."""
        if self.train.deadline_s is not None and self.system == "none":
            raise _PathError(("train", "deadline_s"), "needs a system section (the devices whose virtual time the "
                             "deadline cuts; docs/time.md)")
        if self.system != "none" and self.system.slow_classes:
            classes = self.data.synthetic.classes if self.data.dataset == "synthetic" else 10
            if max(self.system.slow_classes) >= classes:
                raise _PathError(("system", "slow_classes"), f"class {max(self.system.slow_classes)} does not exist "
                                 f"({self.data.dataset} has {classes} classes)")
        return self

    @model_validator(mode="after")
    def _audit_fits(self) -> "Scenario":
        if self.audit == "none":
            return self
        from attacks import ATTACKS
        from attacks.base import check_config as check_attack_config

        a = self.audit
        if a.attack != "auto" and a.attack not in ATTACKS:
            raise _PathError(("audit", "attack"), f"unknown attack {short(a.attack)}; choose auto or one of "
                             f"{', '.join(sorted(ATTACKS))}")
        if isinstance(a.clients, list) and max(a.clients) >= self.data.num_clients:
            raise _PathError(("audit", "clients"), f"partition id {max(a.clients)} does not exist "
                             f"(data.num_clients is {self.data.num_clients})")
        if isinstance(a.clients, int) and a.clients > self.data.num_clients:
            raise _PathError(("audit", "clients"), f"{a.clients} clients but data.num_clients is {self.data.num_clients}")
        if a.attack != "auto":
            threats = ATTACKS[a.attack].threats
            if a.threat not in threats:
                raise _PathError(("audit", "threat"), f"{a.attack} attacks {' or '.join(threats)}, not {a.threat}")
            try:
                if "seed" in a.attack_config:
                    raise ValueError("seed: set audit.seed, not a seed in attack_config")
                check_attack_config(a.attack, a.attack_config)  # types: a str where a number goes fails late
                ATTACKS[a.attack](**a.attack_config)
            except (TypeError, ValueError) as exc:
                raise _PathError(("audit", "attack_config"), str(exc).splitlines()[0]) from None
        return self

    @field_validator("defense", mode="before")
    @classmethod
    def _defense(cls, v: Any) -> Any:
        """A defense block or a list of them (applied in order), each checked by its own params model."""
        from defenses import defense_names, defense_params

        if v is None or v == "none" or v == []:
            return "none"
        blocks = v if isinstance(v, list) else [v]
        out = []
        for i, block in enumerate(blocks):
            at = (str(i),) if isinstance(v, list) else ()
            name = block.get("name") if isinstance(block, dict) else block
            if not isinstance(block, dict) or name not in defense_names():
                raise _PathError(("defense", *at, "name"), f"unknown defense {short(name)}; choose none or one of "
                                 f"{', '.join(defense_names())} (a mapping with its settings, or a list of them)")
            try:
                out.append(defense_params(name)(**block))
            except ValidationError as exc:
                err = exc.errors()[0]
                raise _PathError(("defense", *at, *map(str, err["loc"])), _describe(err, defense_params(name))) from None
        names = [b.name for b in out]
        if len(set(names)) != len(names):
            raise _PathError(("defense",), f"each defense at most once (got {', '.join(names)})")
        return out

    def defenses(self) -> list[BaseModel]:
        """The defense blocks in the order they apply (empty for none)."""
        return [] if self.defense == "none" else list(self.defense)

    @model_validator(mode="after")
    def _features_compose(self) -> "Scenario":
        """The rules each feature imposes on the rest of the scenario, checked by the feature itself
        (``check`` on each defense and on the codec: ``defenses.base``, ``strategies.compression.codec``);
        and at most one defense that accounts an epsilon of its own (one epsilon column, one guarantee)."""
        from defenses import DEFENSES
        from strategies import strategy_names
        from strategies.compression import codec_class
        from strategies.rules import RuleViolation

        blocks = self.defenses()
        accounting = [b.name for b in blocks if DEFENSES[b.name].accounts_epsilon]
        if len(accounting) > 1:
            raise _PathError(("defense",), f"{' and '.join(accounting)} each account their own epsilon; use one "
                             f"of them")
        for i, block in enumerate(blocks if self.privacy != "none" else []):
            bound = DEFENSES[block.name].update_bound(block)
            if bound is not None and bound.norm is None:
                raise _PathError(("privacy",), f"canaries are inserted at the bound on each update's norm, which "
                                 f"{block.name} (defense{'.' + str(i) if len(blocks) > 1 else ''}) moves every round")
        if self.strategy.name not in strategy_names():
            return self  # _strategy_known names the problem
        try:
            codec_class(self.upload_codec()).check(self.upload_params(), self, ("upload",))
            for i, block in enumerate(blocks):
                DEFENSES[block.name].check(block, self, ("defense", *((str(i),) if len(blocks) > 1 else ())))
        except RuleViolation as exc:
            raise _PathError(exc.loc, exc.msg) from None
        return self

    @model_validator(mode="after")
    def _strategy_known(self) -> "Scenario":
        from strategies import get_strategy

        try:
            spec = get_strategy(self.strategy.name)
        except KeyError as exc:
            raise _PathError(("strategy", "name"), str(exc.args[0])) from None
        try:
            params = spec.params(**self.strategy.params())
        except ValidationError as exc:
            err = exc.errors()[0]
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(["name", *spec.params.model_fields])
                raise _PathError(("strategy", *map(str, err["loc"])),
                                 f"unknown key for {self.strategy.name}; allowed: {allowed}") from None
            raise _PathError(("strategy", *map(str, err["loc"])), _describe(err)) from None
        if spec.check is not None:  # the rules the strategy imposes on the rest of the scenario
            from strategies.rules import RuleViolation

            try:
                spec.check(params, self, ("strategy",))
            except RuleViolation as exc:
                raise _PathError(exc.loc, exc.msg) from None
        return self

    @model_validator(mode="after")
    def _engine_fits(self) -> "Scenario":
        """What the chosen engine cannot run is refused here, in one line (``fedsim.engines.vectorized``)."""
        if self.engine.name == "vectorized" or (self.engine.name == "ray" and self.engine.ray.vectorized):
            found = _vectorized_refusal(self)
            if found is not None:
                raise _PathError(*found)
        ray = self.engine.ray
        if self.engine.name == "ray" and self.audit != "none" and _gpu_index(self.audit_device()) > 0:
            raise _PathError(("audit", "device"), _RAY_INDEX)
        if self.engine.name == "ray" and self.audit != "none" and self.audit_device().startswith("cuda"):
            if (ray.num_gpus_audit if ray.num_gpus_audit is not None else ray.num_gpus_per_client) == 0:
                raise _PathError(("engine", "ray", "num_gpus_audit"), f"the audit computes on {self.audit_device()} "
                                 f"but its Ray actor has no GPU share (> 0, fractions allowed; default: "
                                 f"num_gpus_per_client)")
        return self

    def audit_device(self) -> str:
        """Where the audit's attacks compute: ``audit.device``, else ``engine.device``."""
        device = None if self.audit == "none" else self.audit.device
        return device if device is not None else self.engine.device

    def strategy_params(self) -> BaseModel:
        from strategies import get_strategy

        spec = get_strategy(self.strategy.name)
        return spec.params(**self.strategy.params())

    def upload_codec(self) -> str:
        """The upload codec's name."""
        return "none" if self.upload == "none" else str(self.upload["codec"])

    def upload_params(self) -> BaseModel:
        """The upload codec's settings (its params model)."""
        from strategies.compression import codec_params

        if self.upload == "none":
            return codec_params("none")
        return codec_params(self.upload_codec(), {k: v for k, v in self.upload.items() if k != "codec"})

    def nominal_model(self):
        """The scenario's model built at a nominal input size (for checks of its layer types)."""
        return _nominal_model(self)

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        if data.get("privacy") == "none":
            del data["privacy"]  # a scenario without it reads as before the section existed (checkpoints compare it)
        if data.get("system") == "none":  # likewise the virtual clock's sections
            del data["system"]
        if data["train"].get("deadline_s") is None:
            data["train"].pop("deadline_s", None)
        return yaml.safe_dump(data, sort_keys=False)


def _vectorized_refusal(scenario: Any) -> tuple[tuple[str, ...], str] | None:
    """(key path, one-line reason) of the first thing in ``scenario`` the vectorized engine
    (``fedsim.engines.vectorized``) cannot train exactly as the inline engine does, or None."""
    from torch import nn

    from defenses import DEFENSES
    from defenses.base import ClientDefense
    from strategies import get_strategy, strategy_names

    if scenario.engine.name == "vectorized":
        engine, key, instead = "engine vectorized", ("engine", "name"), "use engine inline or ray"
    else:  # a Ray actor's share trained together
        engine, key, instead = "engine.ray.vectorized", ("engine", "ray", "vectorized"), "set engine.ray.vectorized: false"
    if scenario.strategy.name not in strategy_names():
        return None  # the strategy validator names it
    spec = get_strategy(scenario.strategy.name)
    if spec.vector_rule is None:
        able = [n for n in strategy_names() if get_strategy(n).vector_rule is not None]
        return (key, f"{engine} trains only strategies with a vectorised local rule "
                f"({', '.join(able)}); {scenario.strategy.name}'s local rule has none: {instead}")
    why = spec.vector_rule.unsupported(scenario.strategy_params())
    if why:
        return (("strategy",), f"{scenario.strategy.name} on {engine}: {why}")
    blocks = scenario.defenses()
    for i, block in enumerate(blocks):
        client = DEFENSES[block.name].Client
        if client is None:
            continue
        at = ("defense", *((str(i),) if len(blocks) > 1 else ()), "name")
        if client.private_training is not ClientDefense.private_training:
            return (at, f"{block.name} runs each client's local training itself (its own sampler and per-sample "
                    f"steps), which {engine} does not; {instead}")
        if client.wrap_call is not ClientDefense.wrap_call:
            return (at, f"{block.name} wraps each client's whole call, which {engine} does not make "
                    f"(it trains a chunk of clients in one call); {instead}")
    model = scenario.nominal_model()
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        return (("model", "dropout"), f"{engine} refuses dropout: each client draws its masks from its own "
                f"seeded generator in turn, which one vmap over clients does not reproduce; set model.dropout: 0 "
                f"or {instead}")
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        return (("model", "name"), f"{engine} refuses models with buffers ({scenario.model.name}: "
                f"{', '.join(buffers[:3])}{', ...' if len(buffers) > 3 else ''}; BatchNorm statistics change in "
                f"the forward pass); {instead}")
    return None


def _nominal_model(s: Scenario):
    """The scenario's model, for a feature's module check (layer types only: the input size is nominal)."""
    from ..world.models import build_model

    m, d = s.model, s.data
    channels = {"cifar10": 3, "synthetic": d.synthetic.channels}.get(d.dataset, 1)
    size = d.image_size or {"digits": 8, "mnist": 28, "cifar10": 32, "synthetic": d.synthetic.size}.get(d.dataset, 32)
    classes = d.synthetic.classes if d.dataset == "synthetic" else 10
    return build_model(m.name, channels, max(size, 16) if m.name != "mlp" else size, classes, dropout=m.dropout,
                       dropout_at=m.dropout_at, hidden=tuple(m.hidden), init=m.init, seed=0)


class _PathError(ValueError):
    def __init__(self, loc: tuple[str, ...], msg: str):
        super().__init__(msg)
        self.loc, self.msg = loc, msg


def _describe(err: dict, model: type[BaseModel] | None = None) -> str:
    if err["type"] == "extra_forbidden" and model is not None:
        return f"unknown key; allowed: {', '.join(model.model_fields)}"
    msg = err["msg"]
    if "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
        msg += f" (got {short(err['input'])})"
    return msg


def _model_at(loc: tuple, root: type[BaseModel] = Scenario) -> type[BaseModel] | None:
    """The pydantic model whose field list explains an error at ``loc``."""
    model: Any = root
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def parse_scenario(raw: Any) -> Scenario:
    """Validate a mapping; raise ScenarioError with one line naming the key path."""
    if not isinstance(raw, dict):
        raise ScenarioError("scenario must be a mapping of sections (name, seed, data, model, ...)")
    try:
        return Scenario.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        ctx = err.get("ctx", {}) or {}
        inner = ctx.get("error")
        if isinstance(inner, _PathError):
            raise ScenarioError(f"{'.'.join(inner.loc)}: {inner.msg}") from None
        loc = tuple(str(p) for p in err["loc"])
        path = ".".join(loc) or "scenario"
        raise ScenarioError(f"{path}: {_describe(err, _model_at(loc))}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--set a.b.c=value`` overrides (value parsed as YAML) to a raw mapping."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ScenarioError(f"--set {short(item)}: expected key.path=value")
        path, _, text = item.partition("=")
        keys = [k for k in path.strip().split(".")]
        if not all(keys):
            raise ScenarioError(f"--set {short(item)}: empty key in path")
        try:
            value = strict_yaml.load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ScenarioError(f"--set {short(item)}: value is {strict_yaml.describe(exc)}") from None
        node = out
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    return out


# A scenario or sweep file is a few kB; a file larger than this is not one (and would be read whole).
MAX_FILE_BYTES = 10 * 2**20


def load_raw(path: str | Path) -> dict:
    """A scenario or sweep file as a mapping: read as UTF-8, parsed by ``strict_yaml`` (no
    duplicate keys, no alias bombs); anything else is a one-line ScenarioError."""
    p = Path(path)
    if p.is_dir():
        raise ScenarioError(f"{p} is a folder, not a scenario file")
    if not p.exists():
        raise ScenarioError(f"scenario file not found: {p}")
    if not p.is_file():  # a FIFO, a device (/dev/null ...), a socket: not a file to read a scenario from
        raise ScenarioError(f"{p} is not a regular file, not a scenario file")
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ScenarioError(f"{p}: {size:,} bytes is too large for a scenario file "
                                f"(at most {MAX_FILE_BYTES:,} bytes, {MAX_FILE_BYTES // 2**20} MiB)")
        data = p.read_bytes()
    except OSError as exc:
        raise ScenarioError(f"{p}: cannot read the file ({exc.strerror or type(exc).__name__})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ScenarioError(f"{p}: not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line})") from None
    try:
        raw = strict_yaml.load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{p}: {strict_yaml.describe(exc)}") from None
    if raw is None:
        raise ScenarioError(f"{p}: the file is empty")
    if not isinstance(raw, dict):
        raise ScenarioError(f"{p}: top level must be a mapping of sections")
    return raw


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    return parse_scenario(apply_overrides(load_raw(path), overrides or []))


def scenario_from_text(text: str) -> Scenario:
    """Rebuild a scenario from its resolved YAML (how it reaches ClientApps)."""
    return parse_scenario(yaml.safe_load(text))
