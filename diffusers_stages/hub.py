"""Model cards (the Jinja templates of the repository's top-level ``model_cards/`` folder) and Hub upload."""

from __future__ import annotations

import dataclasses
import os
from fnmatch import fnmatch
from pathlib import Path
from typing import TypeVar, Union

from huggingface_hub import HfApi, ModelCard, ModelCardData

REQUIRED_FILES = ("model_index.json", "README.md")
C = TypeVar("C")


def model_cards_dir() -> Path:
    """
    The folder of the model card templates: ``diffusers_stages/model_cards/`` in an installed wheel (the top-level
    ``model_cards/`` folder is shipped there by the ``package-dir`` mapping in ``pyproject.toml``), else the
    repository's ``model_cards/`` beside the package (a source checkout or an editable install).
    """
    package = Path(__file__).resolve().parent
    for folder in (package / "model_cards", package.parent / "model_cards"):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"No model card templates in {package / 'model_cards'} or {package.parent / 'model_cards'}."
    )


def render_model_card(
    template: Union[str, os.PathLike] = "deme_merged.md",
    base_model: str | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
    pipeline_tag: str | None = None,
    widget: list[dict] | None = None,
    **fields,
) -> ModelCard:
    r"""
    Render a model card from a Jinja template (a file in ``model_cards/`` by name, or any path) with
    `huggingface_hub.ModelCard.from_template`; the YAML metadata carries ``library_name: diffusers``, the base model
    and the tags.

    Args:
        template (`str` or `os.PathLike`, defaults to ``"deme_merged.md"``): Template file name or path.
        base_model (`str`, *optional*): The pretrained model the adapters were trained on.
        tags (`list[str]`, *optional*): Hub tags (``diffusers`` and ``diffusers-stages`` are always added).
        license (`str`, *optional*): The license identifier.
        pipeline_tag (`str`, *optional*): E.g. ``"text-to-image"`` or ``"unconditional-image-generation"``.
        widget (`list[dict]`, *optional*): The Hub widget, e.g. ``[{"text": prompt, "output": {"url": "samples.png"}}]``.
        **fields: Template variables (stages, merge weights, training settings, metrics, ...).
    """
    path = Path(template)
    if not path.is_file():
        path = model_cards_dir() / template
    if not path.is_file():
        raise ValueError(
            f"`template` must be a file or one of {sorted(p.name for p in model_cards_dir().glob('*.md'))}."
        )
    all_tags = list(dict.fromkeys(["diffusers", "diffusers-stages", *(tags or [])]))
    data = ModelCardData(
        library_name="diffusers",
        base_model=base_model,
        tags=all_tags,
        license=license,
        pipeline_tag=pipeline_tag,
        widget=widget,
    )
    return ModelCard.from_template(data, template_path=str(path), base_model=base_model, **fields)


DEFAULT_LICENSE = "apache-2.0"  # this project's license, for models trained from scratch


def base_model_license(base_model: str | None) -> str:
    """
    The license of a card: the base model's (from its model card, a local folder or a Hub repo when reachable) when
    there is a base model that declares one, else ``"apache-2.0"``.
    """
    if not base_model:
        return DEFAULT_LICENSE
    readme = Path(base_model) / "README.md"
    try:
        card = ModelCard.load(readme if readme.is_file() else base_model)
    except Exception:  # no card, offline or not a repo: the base model declares nothing we can read
        return DEFAULT_LICENSE
    return card.data.license or DEFAULT_LICENSE


def check_upload_folder(
    folder: Union[str, os.PathLike],
    ignore_patterns: list[str] | None = None,
    required_files: tuple[str, ...] = REQUIRED_FILES,
) -> list[str]:
    """
    Check that ``folder`` is a complete folder for the Hub (``required_files``: by default a diffusers pipeline's
    ``model_index.json`` and a ``README.md`` model card; the card with YAML metadata, safetensors weights for every
    component with weights, no pickles); return its files (relative paths) or raise a `ValueError` naming what is
    missing.
    """
    root = Path(folder)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    files = [f for f in files if not any(fnmatch(f, pat) for pat in ignore_patterns or [])]
    missing = [f for f in required_files if f not in files]
    if missing:
        raise ValueError(f"Upload folder {root} is missing {missing}.")
    if not (root / "README.md").read_text().startswith("---"):
        raise ValueError(f"{root}/README.md has no YAML metadata header.")
    pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    if pickles:
        raise ValueError(f"Upload folder {root} holds pickled weights {pickles}; save with safetensors.")
    for sub in sorted({f.split("/")[0] for f in files if "/" in f}):
        if (root / sub / "config.json").is_file() and not any(
            f.startswith(f"{sub}/") and f.endswith(".safetensors") for f in files
        ):
            raise ValueError(f"Component `{sub}` of {root} has a config but no safetensors weights.")
    return files


def create_hub_repo(
    hub_model_id: str | None,
    output_dir: Union[str, os.PathLike],
    token: str | None = None,
    private: bool = False,
    endpoint: str | None = None,
) -> str:
    r"""
    Create the Hub model repo of a run when the run starts (``exist_ok=True``), so that a bad token or repo name
    fails before any training, as in the diffusers training examples. Returns the full repo id (``"user/name"``) to
    push to at the end.

    Args:
        hub_model_id (`str`, *optional*): ``"user/name"`` or ``"name"`` (the token's namespace); defaults to the
            name of ``output_dir``, like the diffusers examples.
        output_dir (`str` or `os.PathLike`): The run's output folder.
        token (`str`, *optional*): A write token (defaults to the logged-in one).
        private (`bool`, defaults to `False`): Create the repo private.
        endpoint (`str`, *optional*): Another Hub endpoint (e.g. a local test server).
    """
    name = hub_model_id or Path(output_dir).resolve().name
    api = HfApi(endpoint=endpoint, token=token)
    return api.create_repo(name, private=private, exist_ok=True, repo_type="model").repo_id


def start_hub_repo(config: C) -> C:
    """
    For a job config with ``push_to_hub``, ``hub_model_id``, ``hub_token``, ``output_dir`` (and optionally
    ``private``): when pushing, create the repo now on the main process (`create_hub_repo`) and return the config
    with the full repo id in ``hub_model_id``; otherwise return ``config`` unchanged.
    """
    from accelerate import PartialState

    if not config.push_to_hub or not PartialState().is_main_process:
        return config
    private = getattr(config, "private", False)
    repo_id = create_hub_repo(config.hub_model_id, config.output_dir, token=config.hub_token, private=private)
    return dataclasses.replace(config, hub_model_id=repo_id)


def push_to_hub(
    folder: Union[str, os.PathLike],
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload with diffusers-stages",
    endpoint: str | None = None,
    ignore_patterns: list[str] | None = None,
    required_files: tuple[str, ...] = REQUIRED_FILES,
) -> str:
    r"""
    Check ``folder`` (`check_upload_folder`), create the model repo if needed and upload the folder in one commit.
    Returns the commit URL.

    Args:
        folder (`str` or `os.PathLike`): The merged pipeline folder with its model card.
        repo_id (`str`): ``"user/name"`` on the Hub.
        token (`str`, *optional*): A write token (defaults to the logged-in one).
        private (`bool`, defaults to `False`): Create the repo private.
        commit_message (`str`): The commit message.
        endpoint (`str`, *optional*): Another Hub endpoint (e.g. a local test server).
        ignore_patterns (`list[str]`, *optional*): Files not to upload (e.g. ``["checkpoint-*/**", "logs/**"]``).
        required_files (`tuple[str, ...]`): What the folder must hold (default: a pipeline folder's files).
    """
    check_upload_folder(folder, ignore_patterns, required_files)
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=repo_id, folder_path=os.fspath(folder), commit_message=commit_message, ignore_patterns=ignore_patterns
    )
    return str(info.commit_url)
