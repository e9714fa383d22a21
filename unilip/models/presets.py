"""One entry point for every form a trained tokenizer comes in."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from unilip.errors import ConfigError
from unilip.models.tokenizer import CONFIG_NAME, TokenizerConfig, UniLIPTokenizer


def _conf_dir() -> Path:
    """The Hydra configs: `unilip/conf` in an installed package (pyproject maps the repository's conf/
    there), else the repository's top-level conf/ beside the package (a checkout, or an editable install)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "conf"
    return installed if installed.is_dir() else package.parent / "conf"


CONF_DIR = _conf_dir()


def compose_config(name: str, overrides: list[str]):
    """Compose `conf/<name>.yaml` with command-line style overrides, as `python train.py` / `eval.py` would
    (without Hydra's run-time keys: give `run_dir` / `out_dir` explicitly)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def tokenizer_preset(name: str) -> TokenizerConfig:
    """The `TokenizerConfig` of a preset in `conf/model/` (`tiny`, `unilip_1b`, `unilip_2b`) or a YAML path."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        available = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")) if CONF_DIR.exists() else []
        raise FileNotFoundError(f"no tokenizer preset '{name}' ({path} missing); available: {available}")
    node = OmegaConf.to_container(OmegaConf.load(path).config, resolve=True)
    node.pop("_target_", None)
    node.pop("_convert_", None)
    return TokenizerConfig(**node)


def load_tokenizer(source: str | Path, *, preset: str | None = None) -> UniLIPTokenizer:
    """Load a tokenizer from a `save_pretrained` directory or hub id, or a released UniLIP `.pth`.

    A released `.pth` holds weights only, so it needs `preset` (`unilip_1b` or `unilip_2b`).
    """
    path = Path(source)
    if path.suffix in (".pth", ".pt"):
        if preset is None:
            raise ConfigError(f"'{path}' is a released UniLIP checkpoint; pass its preset (unilip_1b or unilip_2b)")
        from unilip.pretrained.internvl import load_unilip_checkpoint

        return load_unilip_checkpoint(path, tokenizer_preset(preset))
    if path.is_dir() and not (path / CONFIG_NAME).exists():
        raise FileNotFoundError(f"'{path}' is a directory without {CONFIG_NAME}: not a saved tokenizer")
    return UniLIPTokenizer.from_pretrained(source)
