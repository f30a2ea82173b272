"""The model registry: names -> (ModelSpec, builder). No I/O here.

A family file registers each named model with ``@register_model(ModelSpec(...))`` on a small builder
function, and its encoder class with ``@register_family``, so that a release folder's config.json can
name the class that rebuilds it.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from musicssl.errors import UnknownModelError

# The model `musicssl.load()` and `musicssl embed` use when no name is given.
DEFAULT_MODEL = "simclr-mini"

# Family modules imported the first time the registry is read, so `import musicssl` stays cheap
# (musicssl.finetune registers the Classifier that fine-tuned releases rebuild).
_FAMILY_MODULES = ("musicssl.models.baselines", "musicssl.models.spec_vit", "musicssl.models.samplecnn",
                   "musicssl.models.pesto", "musicssl.models.hubert", "musicssl.models.conformer",
                   "musicssl.models.omar_rq", "musicssl.models.dasheng", "musicssl.models.music2latent",
                   "musicssl.models.htsat", "musicssl.finetune")


@dataclass(frozen=True)
class ModelSpec:
    """What a named model is: its audio contract, its outputs and where its weights come from.

    ``weights`` is None for models that need none (baselines), ``"hf-hub:org/repo"`` for Hub
    releases, ``"bundled:DIR"`` for a release folder inside the wheel (``musicssl/weights/DIR``),
    or an ``https://`` URL for upstream files hosted elsewhere. ``files`` maps each file to fetch to
    its sha256 (None where upstream publishes none: the sha256 is then recorded on first download);
    ``revision`` pins a Hub commit. ``upstream`` says the files are in the upstream project's own
    format, converted by the family's `load_upstream` (URL sources always are).
    """

    name: str
    family: str
    sample_rate: int  # Hz
    frame_rate: float  # output frames per second
    embed_dim: int
    num_layers: int
    recommended_layer: int  # index into the layers of embed(layers="all"); -1 = last
    context_seconds: float  # window the model sees at once; longer audio is cut and stitched
    weights: str | None = None
    revision: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    needs_weights: bool = True
    license: str = "n/a"
    source: str = "musicssl"
    citation: str = ""
    description: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    upstream: bool = False

    @property
    def converted(self) -> bool:
        """True when loading converts upstream files (then cached as safetensors)."""
        return self.upstream or (self.weights or "").startswith(("https://", "http://"))

    @property
    def pinning(self) -> str:
        """How the weights are pinned, in words (shown by `musicssl info` and `list --verbose`)."""
        if self.weights is None or self.weights.startswith("bundled:"):
            return "inside the package" if self.weights else "no weights"
        rev = f"revision {self.revision}, " if self.revision else ""
        pinned = [f for f, sha in self.files.items() if sha]
        if pinned and len(pinned) == len(self.files):
            return f"{rev}sha256 pinned"
        if pinned:  # e.g. the weights pinned, a small config.json not
            unpinned = ", ".join(f for f, sha in self.files.items() if not sha)
            return f"{rev}sha256 pinned for {', '.join(pinned)}; {unpinned} recorded on first download"
        return f"{rev}sha256 recorded on first download (upstream publishes no checksum)"

    @property
    def pretrained(self) -> bool:
        """True when `load(name)` gives a ready model (weights released, or none needed)."""
        return self.weights is not None or not self.needs_weights

    @property
    def noncommercial(self) -> bool:
        """True when the weights' licence forbids commercial use (a Creative Commons NC licence,
        e.g. "CC-BY-NC-4.0", or any licence string that says non-commercial)."""
        text = self.license.lower().replace("_", "-").replace(" ", "-")
        return bool(re.search(r"(^|-)nc(-|$)", text)) or "non-commercial" in text or "noncommercial" in text

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view, with `pretrained` and `noncommercial` included."""
        d = dataclasses.asdict(self)
        d["pretrained"] = self.pretrained
        d["noncommercial"] = self.noncommercial
        d["pinning"] = self.pinning
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


_MODELS: dict[str, tuple[ModelSpec, Callable[..., Any]]] = {}
_FAMILIES: dict[str, type] = {}
_loaded = False


def canonical(name: str) -> str:
    """Registry key: case- and `-`/`_`-insensitive."""
    return re.sub(r"[-_]", "-", name.strip().lower())


def register_model(spec: ModelSpec) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register `builder(**overrides) -> Encoder` under `spec.name`."""

    def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
        key = canonical(spec.name)
        if key in _MODELS:
            raise ValueError(f"model {spec.name!r} is registered twice")
        _MODELS[key] = (spec, builder)
        return builder

    return wrap


def register_family(name: str) -> Callable[[type], type]:
    """Class decorator: the encoder class that rebuilds a release whose config names `name`."""

    def wrap(cls: type) -> type:
        _FAMILIES[name] = cls
        cls.family = name
        return cls

    return wrap


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        for module in _FAMILY_MODULES:
            importlib.import_module(module)
        _loaded = True


def list_models(pattern: str = "*", pretrained: bool = True) -> list[str]:
    """Registered names matching a glob `pattern` (one without `*?[` matches anywhere in the name:
    "mert" finds "mert-v1-95m"); only ready-to-load ones when `pretrained`."""
    _ensure_loaded()
    pat = canonical(pattern)
    if not any(c in pat for c in "*?["):
        pat = f"*{pat}*"
    return sorted(
        spec.name
        for key, (spec, _) in _MODELS.items()
        if fnmatch.fnmatch(key, pat) and (spec.pretrained or not pretrained)
    )


def _lookup(name: str) -> tuple[ModelSpec, Callable[..., Any]]:
    _ensure_loaded()
    key = canonical(name)
    if key not in _MODELS:
        close = difflib.get_close_matches(key, list(_MODELS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(_MODELS[c][0].name) for c in close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} `musicssl list --all` shows every registered name; "
            "a release on the Hub loads as 'hf-hub:org/repo' and a local one by its folder path."
        )
    return _MODELS[key]


def is_registered(name: str) -> bool:
    """Whether `name` is a registered model name (any case, `-` or `_`)."""
    _ensure_loaded()
    return canonical(name) in _MODELS


def ports_of(repo_id: str) -> list[str]:
    """Registered ports whose upstream files come from the Hub repository `repo_id` ('org/repo',
    any case, as the Hub resolves it)."""
    _ensure_loaded()
    source = f"hf-hub:{repo_id}".lower()
    return sorted(spec.name for spec, _ in _MODELS.values() if spec.converted and (spec.weights or "").lower() == source)


def model_info(name: str) -> ModelSpec:
    """The ModelSpec of a registered name (raises UnknownModelError with suggestions)."""
    return _lookup(name)[0]


def builder(name: str) -> Callable[..., Any]:
    """The builder function of a registered name."""
    return _lookup(name)[1]


def is_family(family: str) -> bool:
    """Whether this musicssl has an encoder class for `family`."""
    _ensure_loaded()
    return family in _FAMILIES


def family_class(family: str) -> type:
    """The encoder class registered for a family name (as written in config.json)."""
    _ensure_loaded()
    if family not in _FAMILIES:
        raise UnknownModelError(
            f"unknown model family {family!r}; this musicssl knows {sorted(_FAMILIES)}. "
            "The release may need a newer musicssl: pip install -U musicssl"
        )
    return _FAMILIES[family]
