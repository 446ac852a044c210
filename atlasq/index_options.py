"""The options of ``atlasq index`` and their defaults, in one place.

Kept free of torch and the other heavy imports so that the command line can take its defaults
(and show them in ``--help``) from here without loading the network code. Both dataclasses are
frozen and check their values when made, so a bad option is refused before anything is written.

:class:`IndexOptions` are the settings an index is built with and keeps (recorded in its meta;
``None`` means "what the index already has, else the default"). :class:`RunSettings` only shape
one run (device, batch size, threads …) and may differ from run to run.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import InvalidOptionError

__all__ = ["IndexOptions", "RunSettings", "INDEX_DEFAULTS", "RUN_DEFAULTS", "FIXED", "APPROX_THRESHOLD",
           "PRECISIONS"]

#: Above this many images an approximate (HNSW) search index is built and used by default.
APPROX_THRESHOLD = 50_000
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # fp16: CUDA only (see model.resolve_precision)


def _whole(value, option: str, minimum: int, *, optional: bool = False) -> None:
    """Refuse anything but an int >= ``minimum`` (``None`` too when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidOptionError(f"{option} must be a whole number of at least {minimum}, not {value!r}")


@dataclass(frozen=True)
class IndexOptions:
    """Settings an index is built with. ``None`` means: what the index already has, else the default."""

    model: str | None = None
    weights: str | None = None
    layers: tuple[str, ...] | None = None
    samples_per_image: int | None = None
    attributions: bool | None = None
    relaxed_maxpool: bool | None = None
    seed: int | None = None

    def __post_init__(self):
        for option, value in (("--model", self.model), ("--weights", self.weights)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InvalidOptionError(f"{option} must be a non-empty name, not {value!r}")
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
            if not layers or not all(isinstance(name, str) and name for name in layers):
                raise InvalidOptionError(f"--layers must name at least one layer, not {self.layers!r}")
            if len(set(layers)) != len(layers):
                raise InvalidOptionError(f"--layers names a layer twice: {', '.join(layers)}")
            object.__setattr__(self, "layers", layers)  # a list from a caller becomes a tuple
        _whole(self.samples_per_image, "--samples-per-image", 1, optional=True)
        _whole(self.seed, "--seed", 0, optional=True)
        for option, value in (("--attributions", self.attributions), ("--relaxed-maxpool", self.relaxed_maxpool)):
            if value is not None and not isinstance(value, bool):
                raise InvalidOptionError(f"{option} must be true or false, not {value!r}")


#: What an index gets for each option nobody gave (``weights=None``: the model's own default).
INDEX_DEFAULTS = IndexOptions(model="inceptionv1", weights=None, layers=("mixed4c",), samples_per_image=4,
                              attributions=False, relaxed_maxpool=False, seed=0)
#: The options an index keeps: a later run may repeat them but not change them.
FIXED = tuple(f.name for f in fields(IndexOptions))


@dataclass(frozen=True)
class RunSettings:
    """How one run of ``atlasq index`` works; none of it changes the index's content.

    ``workers=None``: one decoding thread per core but one; ``streams=None``: see
    :func:`atlasq.indexer.network_streams`; ``approx_threshold=None``: what the index remembers,
    else :data:`APPROX_THRESHOLD`; ``lock_wait``: seconds to wait for another writer of the index.
    """

    precision: str = "auto"
    device: str = "auto"
    batch_size: int = 32
    workers: int | None = None
    streams: int | None = None
    commit_every: int = 256
    approx_threshold: int | None = None
    lock_wait: float = 20.0

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise InvalidOptionError(f"--precision must be {', '.join(PRECISIONS)}, not {self.precision!r}")
        if not isinstance(self.device, str) or not self.device.strip():
            raise InvalidOptionError(f"--device must be auto, cpu, cuda, cuda:N …, not {self.device!r}")
        _whole(self.batch_size, "--batch-size", 1)
        _whole(self.workers, "--workers", 1, optional=True)
        _whole(self.streams, "--streams", 1, optional=True)
        _whole(self.commit_every, "--commit-every", 1)
        _whole(self.approx_threshold, "--approx-threshold", 0, optional=True)
        if isinstance(self.lock_wait, bool) or not isinstance(self.lock_wait, (int, float)) or self.lock_wait < 0:
            raise InvalidOptionError(f"lock_wait must be a number of seconds >= 0, not {self.lock_wait!r}")

    @classmethod
    def given(cls, **values) -> "RunSettings":
        """Settings from keyword arguments, where ``None`` means "the default"."""
        return cls(**{key: value for key, value in values.items() if value is not None})


RUN_DEFAULTS = RunSettings()
